// The lightning-bn tab: a plain ES module (no build step). TensorBoard loads it in an iframe whose <base> is
// this plugin's route prefix, so "runs", "run" and "style.css" are the plugin's own routes.

const CELL_W = 8; // px per step while the strip is between its bounds
const STRIP_MIN = 160; // px of a strip, at least
const STRIP_MAX = 320; // px of a strip, at most
const STRIP_H = 16;
const LOG_RANGE = {std_ratio: [-2, 2], grad_ratio: null}; // log10 bounds; null: from the data

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

function lerp(a, b, t) {
  return a.map((x, i) => Math.round(x + (b[i] - x) * t));
}

function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const at = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(at));
  return lerp(stops[i], stops[i + 1], at - i);
}

const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
const SEQUENTIAL = [[255, 255, 229], [254, 217, 118], [253, 141, 60], [227, 26, 28], [128, 0, 38]];
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

// A colour scale per figure: value -> [r, g, b], and its legend's bounds
function scaleOf(key, figure) {
  if (figure.scale === 'unit') {
    return {lo: 0, hi: 1, log: false, stops: SEQUENTIAL, t: (v) => v};
  }
  let range = LOG_RANGE[key];
  if (!range) {
    const logs = figure.values.flat().filter((v) => v !== null && v > 0).map(Math.log10);
    const lo = logs.length ? Math.floor(Math.min(...logs)) : -6;
    const hi = logs.length ? Math.ceil(Math.max(...logs)) : 0;
    range = [lo, hi > lo ? hi : lo + 1];
  }
  const [lo, hi] = range;
  const stops = key === 'std_ratio' ? DIVERGING : VIRIDIS;
  return {lo, hi, log: true, stops, t: (v) => (v > 0 ? (Math.log10(v) - lo) / (hi - lo) : 0)};
}

function colour(scale, value) {
  if (value === null || value === undefined) return null;
  const [r, g, b] = ramp(scale.stops, scale.t(value));
  return `rgb(${r},${g},${b})`;
}

function fmt(value) {
  if (value === null || value === undefined) return 'not logged';
  if (value === 0) return '0';
  const a = Math.abs(value);
  return a >= 1e4 || a < 1e-3 ? value.toExponential(2) : value.toPrecision(3);
}

function legend(key, figure, scale) {
  const canvas = el('canvas', {width: 120, height: 10, class: 'legend-bar'});
  const ctx = canvas.getContext('2d');
  for (let x = 0; x < 120; x++) {
    const [r, g, b] = ramp(scale.stops, x / 119);
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, 10);
  }
  const lo = scale.log ? `1e${scale.lo}` : `${scale.lo}`;
  const hi = scale.log ? `1e${scale.hi}` : `${scale.hi}`;
  return el('div', {class: 'legend', 'data-figure': key},
    el('span', {class: 'legend-label', text: figure.label + (scale.log ? ' (log)' : '')}),
    el('span', {class: 'legend-lo', text: lo}), canvas, el('span', {class: 'legend-hi', text: hi}));
}

function stripWidth(steps) {
  return Math.max(STRIP_MIN, Math.min(STRIP_MAX, steps.length * CELL_W));
}

function strip(key, row, data, scale, tooltip) {
  const steps = data.steps;
  const width = stripWidth(steps);
  const canvas = el('canvas', {width, height: STRIP_H, class: 'strip', 'data-figure': key});
  const ctx = canvas.getContext('2d');
  const values = data.figures[key].values[row];
  const w = width / Math.max(1, steps.length);
  ctx.fillStyle = '#eee';
  ctx.fillRect(0, 0, width, STRIP_H);
  values.forEach((value, i) => {
    const c = colour(scale, value);
    if (c === null) return;
    ctx.fillStyle = c;
    ctx.fillRect(Math.floor(i * w), 0, Math.ceil(w), STRIP_H);
  });
  const describe = (event) => {
    const i = Math.min(steps.length - 1, Math.max(0, Math.floor(event.offsetX / w)));
    return `${data.layers[row].name} · ${data.figures[key].label} = ${fmt(values[i])} at step ${steps[i]}`;
  };
  canvas.addEventListener('mousemove', (event) => {
    const text = describe(event);
    canvas.title = text;
    tooltip.textContent = text;
    tooltip.style.left = `${event.clientX + 12}px`;
    tooltip.style.top = `${event.clientY + 12}px`;
    tooltip.hidden = false;
  });
  canvas.addEventListener('mouseleave', () => { tooltip.hidden = true; });
  return canvas;
}

function axis(steps) {
  const width = stripWidth(steps);
  const box = el('div', {class: 'axis', style: `width:${width}px`});
  if (!steps.length) return box;
  const w = width / steps.length;
  const ticks = Math.min(4, steps.length);
  for (let k = 0; k < ticks; k++) {
    const i = ticks === 1 ? 0 : Math.round((k * (steps.length - 1)) / (ticks - 1));
    const left = Math.min(width - 1, Math.floor(i * w));
    box.append(el('span', {class: 'tick', style: `left:${left}px`, text: `${steps[i]}`}));
  }
  return box;
}

function flagBadges(layer) {
  const box = el('div', {class: 'flags'});
  for (const flag of layer.flags) {
    const state = flag.active ? 'active' : 'cleared';
    box.append(el('span', {
      class: `flag ${state}`, 'data-flag': flag.name, 'data-first-step': `${flag.first_step}`,
      title: `${flag.reason}; steps ${flag.first_step}–${flag.last_step}${flag.active ? ' (still active)' : ''}`,
      text: `${flag.name} @${flag.first_step}`,
    }));
  }
  return box;
}

function renderRun(view, data, state, tooltip) {
  view.replaceChildren();
  const keys = Object.keys(data.figures);
  const scales = Object.fromEntries(keys.map((k) => [k, scaleOf(k, data.figures[k])]));
  view.append(el('div', {class: 'legends'}, ...keys.map((k) => legend(k, data.figures[k], scales[k]))));
  if (!data.forward_order) {
    view.append(el('p', {class: 'note', text: 'no layers table in this run: layers in the order they were logged'}));
  }
  const grid = el('div', {class: 'grid', style: `grid-template-columns: minmax(10em, max-content) auto auto auto ${
    keys.map((k) => `${stripWidth(data.steps)}px`).join(' ')}`});
  grid.append(el('div', {class: 'head', text: 'layer'}), el('div', {class: 'head', text: 'type'}),
    el('div', {class: 'head', text: 'activation'}), el('div', {class: 'head', text: 'flags (first step)'}));
  for (const k of keys) grid.append(el('div', {class: 'head'}, el('div', {text: data.figures[k].label}), axis(data.steps)));

  const needle = state.filter.trim().toLowerCase();
  let rows = data.layers.map((layer, i) => ({layer, i}));
  if (needle) {
    rows = rows.filter(({layer}) => [layer.name, layer.module_type, layer.activation, layer.kind,
      ...layer.flags.map((f) => f.name)].some((s) => s && s.toLowerCase().includes(needle)));
  }
  if (state.sort === 'flagged') {
    const first = (l) => (l.first_flagged === null ? Infinity : l.first_flagged);
    rows.sort((a, b) => first(a.layer) - first(b.layer) || a.i - b.i);
  }
  for (const {layer, i} of rows) {
    const cells = [
      el('div', {class: 'name', title: layer.name, text: layer.short}),
      el('div', {class: 'type', text: layer.module_type || layer.kind || ''}),
      el('div', {class: 'act', text: layer.activation || ''}),
      flagBadges(layer),
      ...keys.map((k) => strip(k, i, data, scales[k], tooltip)),
    ];
    const row = el('div', {class: `row${layer.flags.length ? ' flagged' : ''}`, 'data-layer': layer.name});
    row.append(...cells);
    grid.append(row);
  }
  view.append(grid, el('p', {class: 'count', text: `${rows.length} of ${data.layers.length} layers, ${
    data.steps.length} logged steps`}));
}

export async function render() {
  document.head.append(el('link', {rel: 'stylesheet', href: './style.css'}));
  const tooltip = el('div', {class: 'tooltip', hidden: ''});
  const runSelect = el('select', {id: 'run'});
  const sortSelect = el('select', {id: 'sort'},
    el('option', {value: 'forward', text: 'forward order'}), el('option', {value: 'flagged', text: 'first flagged'}));
  const filter = el('input', {id: 'filter', type: 'search', placeholder: 'filter layers, types, flags'});
  const view = el('div', {id: 'view'});
  const status = el('p', {id: 'status', class: 'note'});
  document.body.append(el('div', {class: 'controls'},
    el('label', {}, 'run ', runSelect), el('label', {}, 'sort ', sortSelect), filter), status, view, tooltip);

  const state = {sort: 'forward', filter: '', data: null};
  const redraw = () => { if (state.data) renderRun(view, state.data, state, tooltip); };
  const load = async () => {
    status.textContent = `loading ${runSelect.value}…`;
    try {
      state.data = await getJSON(`./run?run=${encodeURIComponent(runSelect.value)}`);
      status.textContent = '';
      document.body.dataset.loaded = runSelect.value;
      redraw();
    } catch (err) {
      status.textContent = `could not load ${runSelect.value}: ${err.message}`;
    }
  };
  runSelect.addEventListener('change', load);
  sortSelect.addEventListener('change', () => { state.sort = sortSelect.value; redraw(); });
  filter.addEventListener('input', () => { state.filter = filter.value; redraw(); });

  const {runs} = await getJSON('./runs');
  if (!runs.length) {
    status.textContent = 'no runs with event files under the log directory';
    return;
  }
  for (const run of runs) runSelect.append(el('option', {value: run, text: run}));
  await load();
}
