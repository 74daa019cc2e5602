"""See a decode: every forward of one answer recorded through the step hook, written as JSON and as one
self-contained HTML page (inline CSS and JS, no network) that shows how the canvas fills.

``trace(model, tokenizer, prompt, **generate_kwargs)`` returns the record: per forward, the block it worked
on, each block position's guess, confidence and (learn2pd) filter score with tau, which positions it fixed;
per answer position, the forward that fixed it and whether EoTP filled it; forwards per block. Tracing
only observes: the decode is the one ``generate`` runs without it (the hook turns off CUDA graphs and row
compaction, which do not change tokens). ``write_html`` draws one or two records side by side; ``write_png``
a summary strip (matplotlib, ``pip install 'l2pd[plot]'``).
"""

from __future__ import annotations

import html
import json
import time
from typing import Any

from .decode import generate
from .models import adapter_for

TRACE_VERSION = 1


def trace(model: Any, tokenizer: Any, prompt: str, chat: bool = True, **generate_kwargs: Any) -> dict[str, Any]:
    """Decode ``prompt`` (wrapped in the tokenizer's chat template unless ``chat=False``) and record it."""
    from l2pd_kernels.reference import filter_scores

    from .demo.tokenizer import prompt_text

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("trace needs a non-empty prompt")
    for key in ("on_step", "return_dict_in_generate", "streamer"):
        if key in generate_kwargs:
            raise ValueError(f"trace sets {key} itself")
    adapter = adapter_for(model)
    text = prompt_text(tokenizer, prompt) if chat else prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(adapter.device)
    generate_kwargs.setdefault("filter", getattr(model, "l2pd_filter", None))
    flt = generate_kwargs["filter"]
    strategy = generate_kwargs.get("strategy") or ("learn2pd" if flt is not None else "threshold")
    use_filter = strategy == "learn2pd" and flt is not None
    mask_id = generate_kwargs.get("mask_token_id") or adapter.mask_id
    steps: list[dict[str, Any]] = []

    def on_step(block_start, step, token, prob, canvas, margin=None, entropy=None):
        L = token.shape[1]
        masked = canvas[0, block_start : block_start + L] == mask_id
        rec = {"block_start": int(block_start), "step": int(step), "guess": token[0].tolist(),
               "confidence": [round(float(p), 5) for p in prob[0].float()], "masked": masked.tolist(),
               "canvas_masked": (canvas[0] == mask_id).tolist()}
        if use_filter:
            score = filter_scores(prob[:1], masked[None], flt.weights(prob.device), flt.block_length, flt.inputs,
                                  flt.kind, None if margin is None else margin[:1],
                                  None if entropy is None else entropy[:1], step)[0]
            rec["filter_score"] = [round(float(s), 5) for s in score]
        steps.append(rec)

    t0 = time.perf_counter()
    out = generate(model, ids, on_step=on_step, return_dict_in_generate=True,
                   step_stats=use_filter and flt.needs_stats, **generate_kwargs)
    seconds = time.perf_counter() - t0
    P = ids.shape[1]
    final = out.sequences[0].tolist()
    answer = final[P:]
    G = len(answer)
    eos = generate_kwargs.get("eos_token_id") or adapter.eos_id
    # the forward that fixed each position: masked in the canvas before it, not before the next one
    after = [s["canvas_masked"] for s in steps[1:]] + [[False] * len(final)]
    fixed_at, eotp_filled = [None] * G, [False] * G
    for f, (s, nxt) in enumerate(zip(steps, after)):
        L = len(s["guess"])
        for i in range(G):
            pos = P + i
            if fixed_at[i] is None and s["canvas_masked"][pos] and not nxt[pos]:
                fixed_at[i] = f
                in_block = s["block_start"] <= pos < s["block_start"] + L
                # a position fixed to end-of-text by this forward without being its guess: EoTP's fill
                guessed = in_block and s["guess"][pos - s["block_start"]] == answer[i]
                eotp_filled[i] = answer[i] == eos and not guessed
    for s in steps:
        del s["canvas_masked"]
    end = answer.index(eos) if eos in answer else G
    per_block: dict[int, int] = {}
    for s in steps:
        per_block[s["block_start"] - P] = per_block.get(s["block_start"] - P, 0) + 1
    tau = generate_kwargs.get("threshold")
    if tau is None and use_filter:
        tau = flt.threshold
    config = {k: v for k, v in generate_kwargs.items() if k != "filter" and isinstance(v, (int, float, str, bool))}
    config["strategy"] = strategy
    return {
        "version": TRACE_VERSION, "prompt": prompt, "config": config, "tau": tau, "filter": use_filter,
        "prompt_tokens": P, "answer_ids": answer, "answer_pieces": [tokenizer.decode([t]) for t in answer],
        "answer_text": tokenizer.decode(answer[:end], skip_special_tokens=True), "end_of_text": end,
        "fixed_at": fixed_at, "eotp_filled": eotp_filled, "forwards": len(steps),
        "forwards_per_block": per_block, "seconds": seconds, "steps": steps,
    }


def label(rec: dict[str, Any]) -> str:
    c = rec["config"]
    parts = [c["strategy"]]
    if rec.get("tau") is not None and c["strategy"] != "steps":
        parts.append(f"tau {rec['tau']:g}")
    if c.get("eotp") not in (None, False, "off"):
        parts.append(f"EoTP {c['eotp']}" if isinstance(c["eotp"], str) else "EoTP")
    if c.get("cache", "none") != "none":
        parts.append(f"{c['cache']} cache")
    return ", ".join(parts)


_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:18px} .run{margin:18px 0;padding:12px;border:1px solid #ddd;border-radius:8px}
.meta{color:#555;margin:4px 0 10px} .cells{display:flex;flex-wrap:wrap;gap:2px}
.cell{min-width:18px;padding:3px 4px;border-radius:3px;font:12px ui-monospace,monospace;white-space:pre;
      border:1px solid transparent;cursor:default}
.cell.mask{background:#eee;color:#aaa} .cell.block{border-color:#333}
.cell.eotp{background:#d9d9d9 !important;color:#777}
.cell.new{outline:2px solid #d33}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;padding:6px 8px;border-radius:4px;
     font:12px ui-monospace,monospace;display:none;white-space:pre}
.legend{font-size:12px;color:#555}
"""

_JS = """
const runs = JSON.parse(document.getElementById('data').textContent);
const slider = document.getElementById('step');
const maxF = Math.max(...runs.map(r => r.forwards));
slider.max = maxF; slider.value = maxF;
const tip = document.getElementById('tip');
function colour(f, n) { const h = 240 - 240 * (n > 1 ? f / (n - 1) : 0); return `hsl(${h},70%,80%)`; }
function show(e, text) { tip.textContent = text; tip.style.display = 'block';
  tip.style.left = (e.clientX + 12) + 'px'; tip.style.top = (e.clientY + 12) + 'px'; }
function render() {
  const t = Number(slider.value);
  document.getElementById('stepval').textContent = t;
  runs.forEach((r, k) => {
    const box = document.getElementById('cells' + k);
    box.innerHTML = '';
    const shown = Math.min(r.answer_ids.length, r.end_of_text + 1);
    const cur = t > 0 && t <= r.forwards ? r.steps[t - 1] : null;
    for (let i = 0; i < shown; i++) {
      const c = document.createElement('span');
      c.className = 'cell';
      const f = r.fixed_at[i];
      const fixed = f !== null && f < t;
      if (fixed) { c.textContent = r.answer_pieces[i].replace(/\\n/g, '\\u23ce');
        c.style.background = colour(f, r.forwards);
        if (r.eotp_filled[i]) c.classList.add('eotp'); if (f === t - 1) c.classList.add('new'); }
      else { c.textContent = '\\u2591'; c.classList.add('mask'); }
      const pos = r.prompt_tokens + i;
      let j = -1;
      if (cur && pos >= cur.block_start && pos < cur.block_start + cur.guess.length) {
        c.classList.add('block'); j = pos - cur.block_start; }
      c.addEventListener('mousemove', e => {
        let s = `position ${i}  token ${JSON.stringify(r.answer_pieces[i])}\\n`;
        s += f === null ? 'never fixed' : `fixed by forward ${f + 1} of ${r.forwards}`;
        if (r.eotp_filled[i]) s += ' (EoTP fill)';
        if (j >= 0) { s += `\\nforward ${t}: guess ${cur.guess[j]}  confidence ${cur.confidence[j].toFixed(4)}`;
          if (cur.filter_score) s += `  filter ${cur.filter_score[j].toFixed(4)} (tau ${r.tau})`; }
        show(e, s); });
      c.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
      box.appendChild(c);
    }
  });
}
slider.addEventListener('input', render);
render();
"""


def render_html(records: list[dict[str, Any]]) -> str:
    """One page, no external resources: the runs side by side (stacked), a step slider, hover details."""
    runs = []
    for k, r in enumerate(records):
        blocks = ", ".join(f"{n}" for _, n in sorted(r["forwards_per_block"].items(), key=lambda kv: int(kv[0])))
        runs.append(
            f'<div class="run"><b>{html.escape(label(r))}</b>'
            f'<div class="meta">{r["forwards"]} forwards ({html.escape(blocks)} per block), '
            f'{r["end_of_text"]} answer tokens, {r["seconds"]:.2f} s</div>'
            f'<div class="cells" id="cells{k}"></div></div>')
    data = json.dumps(records).replace("</", "<\\/")
    prompt = html.escape(records[0]["prompt"])
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>l2pd trace</title><style>{_CSS}</style>'
            f'</head><body><h1>l2pd trace</h1><div class="meta">{prompt}</div>'
            f'<label>after forward <input type="range" id="step" min="0" value="0"> <span id="stepval"></span>'
            f'</label><div class="legend">colour: the forward that fixed the token (blue early, red late); '
            f'framed: the block the forward works on; grey: filled by EoTP; hover a cell for details</div>'
            f'{"".join(runs)}<div id="tip"></div>'
            f'<script type="application/json" id="data">{data}</script><script>{_JS}</script></body></html>')


def write_html(records: list[dict[str, Any]], path: str) -> None:
    with open(path, "w") as f:
        f.write(render_html(records))


def write_png(records: list[dict[str, Any]], path: str) -> None:
    """A summary strip per run: each answer token coloured by the forward that fixed it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the PNG summary needs matplotlib: pip install 'l2pd[plot]'") from None
    import numpy as np

    fig, axes = plt.subplots(len(records), 1, figsize=(10, 1.2 * len(records) + 0.4), squeeze=False)
    for ax, r in zip(axes[:, 0], records):
        n = r["end_of_text"] + 1 if r["end_of_text"] < len(r["answer_ids"]) else len(r["answer_ids"])
        row = np.array([np.nan if f is None else f + 1 for f in r["fixed_at"][:n]], dtype=float)[None]
        im = ax.imshow(row, aspect="auto", cmap="viridis", vmin=1, vmax=max(1, r["forwards"]))
        ax.set_yticks([])
        ax.set_xlabel("answer position")
        ax.set_title(f"{label(r)}: {r['forwards']} forwards", fontsize=9, loc="left")
        fig.colorbar(im, ax=ax, pad=0.01, label="forward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
