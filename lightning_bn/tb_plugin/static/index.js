// The lightning-bn tab: a plain ES module (no build step). TensorBoard loads it in an iframe whose <base> is
// this plugin's route prefix, so "runs", "run" and "style.css" are the plugin's own routes.

const CELL_W = 8; // px per step while the strip is between its bounds
const STRIP_MIN = 110; // px of a strip, at least
const STRIP_MAX = 320; // px of a strip, at most
const STRIP_H = 16;
const NOT_LOGGED = [0xee, 0xee, 0xee, 0xff]; // #eee, opaque
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
  if (figure.scale === 'transmission') { // 0 (blocked) .. 1 (healthy, white) .. >=2 (amplified)
    return {lo: 0, hi: 2, log: false, stops: [...DIVERGING].reverse(), t: (v) => v / 2, mark: [1, '1 = healthy'],
      over: true};
  }
  if (figure.scale === 'kurtosis') { // log10 1..1000, a Gaussian's 3 marked
    return {lo: 0, hi: 3, log: true, stops: SEQUENTIAL, t: (v) => (v > 0 ? Math.log10(v) / 3 : 0),
      mark: [Math.log10(3), '3 = Gaussian']};
  }
  if (figure.scale === 'logit') { // a max attention logit: log10 1..1000, the report's bound (100) marked
    return {lo: 0, hi: 3, log: true, stops: SEQUENTIAL, t: (v) => (v > 0 ? Math.log10(v) / 3 : 0),
      mark: [2, '100 = bound']};
  }
  if (figure.scale === 'retained') { // a fraction of the starting value: 0 (collapsed, dark) .. >=1 (pale)
    return {lo: 0, hi: 1, log: false, stops: [...SEQUENTIAL].reverse(), t: (v) => v, mark: [0.1, '0.1 = collapse'],
      over: true};
  }
  if (figure.scale === 'signed') { // log Z: -40 .. 40, 0 (white) healthy
    return {lo: -40, hi: 40, log: false, stops: DIVERGING, t: (v) => (v + 40) / 80, mark: [0, '0']};
  }
  let range = LOG_RANGE[key];
  if (!range) { // a loop, not Math.min(...values): 61 x 1,000 arguments overflow the stack
    let min = Infinity;
    let max = -Infinity;
    for (const row of figure.values) {
      for (const v of row) {
        if (v !== null && v > 0) {
          if (v < min) min = v;
          if (v > max) max = v;
        }
      }
    }
    const lo = min < Infinity ? Math.floor(Math.log10(min)) : -6;
    const hi = max > -Infinity ? Math.ceil(Math.log10(max)) : 0;
    range = [lo, hi > lo ? hi : lo + 1];
  }
  const [lo, hi] = range;
  const stops = key === 'std_ratio' ? DIVERGING : VIRIDIS;
  return {lo, hi, log: true, stops, t: (v) => (v > 0 ? (Math.log10(v) - lo) / (hi - lo) : 0)};
}

// The scale's colours at 256 levels of t, [r, g, b] at 3i: a strip colours its cells from it without strings
function lutOf(scale) {
  if (!scale.lut) {
    scale.lut = new Uint8ClampedArray(256 * 3);
    for (let i = 0; i < 256; i++) scale.lut.set(ramp(scale.stops, i / 255), 3 * i);
  }
  return scale.lut;
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
  let mark = [];
  if (scale.mark) {
    const [at, text] = scale.mark;
    const x = Math.round(((at - scale.lo) / (scale.hi - scale.lo)) * 119);
    ctx.fillStyle = '#000';
    ctx.fillRect(x, 0, 1, 10);
    mark = [el('span', {class: 'legend-mark', text: `(| ${text})`})];
  }
  const lo = scale.log ? `1e${scale.lo}` : `${scale.lo}`;
  const hi = scale.log ? `1e${scale.hi}` : `${scale.over ? '≥' : ''}${scale.hi}`;
  return el('div', {class: 'legend', 'data-figure': key},
    el('span', {class: 'legend-label', text: figure.label + (scale.log ? ' (log)' : '')}),
    el('span', {class: 'legend-lo', text: lo}), canvas, el('span', {class: 'legend-hi', text: hi}), ...mark);
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
  // one row of pixels (#eee where not logged; a pixel shared by several steps shows the last), copied down the strip
  const lut = lutOf(scale);
  const line = new Uint8ClampedArray(width * 4);
  for (let x = 0; x < width; x++) line.set(NOT_LOGGED, 4 * x);
  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (value === null || value === undefined) continue;
    const t = scale.t(value);
    const k = 3 * Math.round(255 * (t > 1 ? 1 : t > 0 ? t : 0));
    const from = Math.floor(i * w);
    const to = Math.min(width, from + Math.max(1, Math.ceil(w)));
    for (let x = from; x < to; x++) {
      line[4 * x] = lut[k];
      line[4 * x + 1] = lut[k + 1];
      line[4 * x + 2] = lut[k + 2];
    }
  }
  const image = ctx.createImageData(width, STRIP_H);
  for (let y = 0; y < STRIP_H; y++) image.data.set(line, 4 * width * y);
  ctx.putImageData(image, 0, 0);
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
    // the last tick ends at the strip's right edge (right-aligned), so it never runs into the next strip's first
    const last = ticks > 1 && k === ticks - 1;
    const place = last ? 'right:0' : `left:${Math.min(width - 1, Math.floor(i * w))}px`;
    box.append(el('span', {class: 'tick', style: place, text: `${steps[i]}`}));
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

const SVG = 'http://www.w3.org/2000/svg';
const CURVE_W = 260;
const CURVE_H = 90;

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value);
  }
  return node;
}

// One small line chart per figure of layer `row` over the logged steps (log10 y for the log-scaled figures)
function curves(data, row, keys) {
  const box = el('div', {class: 'curves', 'data-layer': data.layers[row].name});
  const steps = data.steps;
  for (const key of keys) {
    const figure = data.figures[key];
    const log = figure.scale === 'log' || figure.scale === 'kurtosis' || figure.scale === 'logit';
    const values = figure.values[row];
    // on a log axis a 0 (a dead layer's std, a frozen layer's update) has no place: it is drawn on a floor line one
    // decade under the smallest positive value, labelled 0, and the chart's label says so
    let lo = Infinity;
    let hi = -Infinity;
    let zeros = false;
    for (const v of values) {
      if (v === null) continue;
      if (log && v <= 0) { zeros = zeros || v === 0; continue; }
      const at = log ? Math.log10(v) : v;
      if (at < lo) lo = at;
      if (at > hi) hi = at;
    }
    const floor = zeros ? (lo < Infinity ? Math.floor(lo) - 1 : 0) : null;
    if (zeros) { lo = floor; if (hi < floor) hi = floor; }
    const y = (v) => (v === null ? null : log ? (v > 0 ? Math.log10(v) : v === 0 ? floor : null) : v);
    const points = [];
    values.forEach((v, i) => { const at = y(v); if (at !== null) points.push([steps[i], at]); });
    const chart = svg('svg', {class: 'curve', 'data-figure': key, width: CURVE_W, height: CURVE_H,
      viewBox: `0 0 ${CURVE_W} ${CURVE_H}`});
    if (zeros) chart.dataset.zeroFloor = `${floor}`;
    chart.append(svg('text', {x: 4, y: 11, class: 'curve-label',
      text: figure.label + (log ? (zeros ? ' (log, 0 on the floor)' : ' (log)') : '')}));
    if (points.length) {
      const xs = [steps[0], steps[steps.length - 1]];
      if (hi === lo) { lo -= 0.5; hi += 0.5; }
      const px = (s) => 30 + ((s - xs[0]) / Math.max(1, xs[1] - xs[0])) * (CURVE_W - 36);
      const py = (v) => CURVE_H - 14 - ((v - lo) / (hi - lo)) * (CURVE_H - 32);
      chart.append(svg('rect', {x: 30, y: 18, width: CURVE_W - 36, height: CURVE_H - 32, class: 'curve-frame'}));
      chart.append(svg('polyline', {points: points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`)
        .join(' '), class: 'curve-line'}));
      const tick = (v) => (zeros && v === floor ? '0' : fmt(log ? 10 ** v : v));
      if (zeros) {
        chart.append(svg('line', {x1: 30, x2: CURVE_W - 6, y1: py(floor).toFixed(1), y2: py(floor).toFixed(1),
          class: 'curve-floor'}));
      }
      chart.append(svg('text', {x: 2, y: 22, class: 'curve-tick', text: tick(hi)}),
        svg('text', {x: 2, y: CURVE_H - 14, class: 'curve-tick', text: tick(lo)}),
        svg('text', {x: 30, y: CURVE_H - 2, class: 'curve-tick', text: `${xs[0]}`}),
        svg('text', {x: CURVE_W - 6, y: CURVE_H - 2, class: 'curve-tick', 'text-anchor': 'end', text: `${xs[1]}`}));
    } else {
      chart.append(svg('text', {x: 4, y: 40, class: 'curve-tick', text: 'not logged'}));
    }
    box.append(chart);
  }
  return box;
}

// A row's strip of figure `key`, drawn once per loaded run (a redraw after a click, a sort or a filter moves it)
function stripOf(state, key, row, data, scale, tooltip) {
  const id = `${key}\n${row}`;
  let canvas = state.strips.get(id);
  if (!canvas) {
    canvas = strip(key, row, data, scale, tooltip);
    state.strips.set(id, canvas);
  }
  return canvas;
}

function renderRun(view, data, state, tooltip) {
  view.replaceChildren();
  const keys = Object.keys(data.figures);
  if (!state.scales) state.scales = Object.fromEntries(keys.map((k) => [k, scaleOf(k, data.figures[k])]));
  const scales = state.scales;
  view.append(el('div', {class: 'legends'}, ...keys.map((k) => legend(k, data.figures[k], scales[k]))));
  if (!data.forward_order) {
    view.append(el('p', {class: 'note', text: 'no layers table in this run: layers in the order they were logged'}));
  }
  const grid = el('div', {class: 'grid', style: `grid-template-columns: max-content max-content max-content auto ${
    keys.map((k) => `${stripWidth(data.steps)}px`).join(' ')}`});
  grid.append(el('div', {class: 'head', text: 'layer'}), el('div', {class: 'head', text: 'type'}),
    el('div', {class: 'head', text: 'activation'}), el('div', {class: 'head', text: 'flags (first step)'}));
  for (const k of keys) {
    const label = data.figures[k].label;
    grid.append(el('div', {class: 'head'}, el('div', {class: 'fig-label', title: label, text: label}), axis(data.steps)));
  }

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
  const grouped = state.sort === 'forward';
  const sizes = {};
  for (const {layer} of rows) if (layer.group) sizes[layer.group] = (sizes[layer.group] || 0) + 1;
  let current = null;
  for (const {layer, i} of rows) {
    const group = grouped ? layer.group : null;
    if (group && group !== current) {
      const closed = state.collapsed.has(group);
      const header = el('div', {class: `group${closed ? ' collapsed' : ''}`, 'data-group': group,
        text: `${closed ? '▸' : '▾'} ${layer.group_label || group} (${sizes[group]} layers)`});
      header.addEventListener('click', () => {
        if (!state.collapsed.delete(group)) state.collapsed.add(group);
        renderRun(view, data, state, tooltip);
      });
      grid.append(header);
    }
    current = group;
    if (group && state.collapsed.has(group)) continue;
    const cells = [
      el('div', {class: 'name', title: layer.name, text: layer.short}),
      el('div', {class: 'type', text: layer.module_type || layer.kind || ''}),
      el('div', {class: 'act', text: layer.activation || ''}),
      flagBadges(layer),
      ...keys.map((k) => stripOf(state, k, i, data, scales[k], tooltip)),
    ];
    const row = el('div', {class: `row${layer.flags.length ? ' flagged' : ''}`, 'data-layer': layer.name});
    if (group) row.dataset.group = group;
    row.append(...cells);
    row.addEventListener('click', () => {
      if (!state.open.delete(layer.name)) state.open.add(layer.name);
      renderRun(view, data, state, tooltip);
    });
    grid.append(row);
    if (state.open.has(layer.name)) grid.append(curves(data, i, keys));
  }
  view.append(grid, el('p', {class: 'count', text: `${rows.length} of ${data.layers.length} layers, ${
    data.steps.length} logged steps`}));
  document.body.dataset.ready = '1'; // every row of the run is drawn (the benchmark waits for it)
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

  const state = {sort: 'forward', filter: '', data: null, collapsed: new Set(), open: new Set(), strips: new Map(),
    scales: null};
  const redraw = () => { if (state.data) renderRun(view, state.data, state, tooltip); };
  const load = async () => {
    status.textContent = `loading ${runSelect.value}…`;
    document.body.dataset.ready = '';
    const began = performance.now();
    try {
      state.data = await getJSON(`./run?run=${encodeURIComponent(runSelect.value)}`);
      const fetched = performance.now();
      state.collapsed.clear();
      state.open.clear();
      state.strips.clear();
      state.scales = null;
      status.textContent = '';
      document.body.dataset.loaded = runSelect.value;
      redraw();
      // milliseconds of the last load: fetching and parsing the run's JSON, then drawing it (the benchmark reads them)
      document.body.dataset.timing = JSON.stringify({fetch_ms: Math.round(fetched - began),
        draw_ms: Math.round(performance.now() - fetched)});
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
