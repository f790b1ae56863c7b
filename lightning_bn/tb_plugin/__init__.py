"""The lightning-bn tab of TensorBoard (an adapter, like :mod:`lightning_bn.cli`): a dynamic plugin found through the
``tensorboard_plugins`` entry point once lightning-bn is installed. Per run, one row per watched layer in forward
order (name, module type, activation kind), a layer x step heatmap strip per figure (std relative to the first layer
of its kind, saturation, dead fraction, ‖g‖/‖w‖, gradient transmission, update ratio, kurtosis: those logged) and
the report's flags with the step each started. Rows of one numbered block (``bert.encoder.layer.3.``) sit under a
header that collapses them; a click on a row opens its curves, one line chart per figure.

:mod:`.data` builds what the routes answer (no TensorBoard import); :mod:`.plugin` is the TensorBoard plugin.
"""

from .data import FIGURES, block_of, list_runs, run_data, short_names

__all__ = ["FIGURES", "LightningBNPlugin", "block_of", "list_runs", "run_data", "short_names"]


def __getattr__(name: str):  # the plugin class imports TensorBoard: only on first use
    if name == "LightningBNPlugin":
        from .plugin import LightningBNPlugin

        return LightningBNPlugin
    raise AttributeError(name)
