"""Interactive circuit viewer: one self-contained HTML file (inline JS, CSS and image; no server, no network).

Text and image prompts side by side; every node of both circuits by layer and position (per cell: heads on the
left half, neurons on the right, each on its own colour scale); hover a cell, token or image patch for its nodes,
scores, token and patch; click a position (cell, token or patch) to highlight its nodes, and the position at the
same offset from the end of Q or G in the other prompt. The URL fragment holds the selection
(`view.html#select=image:17`), so a selection can be linked, and a headless browser can render it.
"""
from __future__ import annotations

import base64
import html
import io
import json

TOP_NEURONS = 5  # neurons listed per (layer, position) on hover; the cell's count covers every neuron


def panel_data(circuit, pair, scores=None, regions: dict | None = None) -> dict:
    """What the viewer shows of one circuit: tokens, spans, heads (every one), neurons per (layer, position) (count,
    Σ |score|, the TOP_NEURONS largest), the image as a PNG data URI and the patch regions."""
    circuit.check_match(pair, "pair")
    records = circuit.nodes(pair, scores)
    heads, neurons = [], {}
    for r in records:
        score = r.get("score")
        if r["kind"] == "head":
            heads.append([r["layer"], r["position"], r["unit"], score])
            continue
        cell = neurons.setdefault(f"{r['layer']},{r['position']}", [0, 0.0, []])
        cell[0] += 1
        cell[1] += abs(score or 0.0)
        if len(cell[2]) < TOP_NEURONS:  # records come largest |score| first when scored
            cell[2].append([r["unit"], score])
    image = None
    if pair.prompt.image is not None:
        buf = io.BytesIO()
        pair.prompt.image.convert("RGB").save(buf, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    if regions is None:
        rows, cols, where = pair.grid
        regions = {pos: (r / rows, c / cols, (r + 1) / rows, (c + 1) / cols) for pos, (r, c) in where.items()}
    return {"modality": pair.prompt.modality, "tokens": list(pair.tokens), "spans": dict(pair.spans),
            "layers": int(circuit.heads.shape[0]), "heads": heads, "neurons": neurons, "image": image,
            "regions": {str(k): list(v) for k, v in regions.items()}, "circuit": repr(circuit),
            "answer": pair.prompt.answer, "scored": scores is not None}


def page(panels: list[dict], title: str) -> str:
    """The HTML page of `panels` (panel_data of the textual and the visual circuit)."""
    data = json.dumps(panels, allow_nan=False).replace("</", "<\\/")  # no "</script>" inside the script
    return (_TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data))


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:12px;color:#222;background:#fff}
h1{font-size:16px;margin:0 0 4px}
.help{color:#555;margin-bottom:8px}
.panels{display:flex;gap:24px;align-items:flex-start}
.panel{flex:1;min-width:0}
.panel h2{font-size:14px;margin:4px 0}
.repr{font:11px monospace;color:#444;margin-bottom:6px;word-break:break-all}
.tokens{font:12px monospace;line-height:1.9;margin-bottom:6px}
.tok{padding:1px 2px;margin:0 1px;border-radius:3px;cursor:pointer;border:2px solid transparent}
.tok.D{background:#e8f0fe}.tok.Q{background:#fef7e0}.tok.G{background:#e6f4ea}
.tok.sel{border-color:#ff00ff}
.imgwrap{position:relative;display:inline-block;margin-bottom:6px}
.imgwrap img{display:block;width:256px;height:auto;image-rendering:pixelated}
.patch{position:absolute;box-sizing:border-box;border:1px solid rgba(0,0,0,.15);cursor:pointer}
.patch.sel{border:3px solid #ff00ff}
svg .cell{cursor:pointer}
svg text{font:10px sans-serif;fill:#555}
#tip{position:fixed;pointer-events:none;background:#fffbe6;border:1px solid #999;padding:4px 6px;font:11px monospace;
 white-space:pre;display:none;z-index:9;max-width:520px}
.legend{font-size:11px;color:#555}
.sw{display:inline-block;width:10px;height:10px;vertical-align:middle;margin:0 3px}
</style></head>
<body>
<h1>__TITLE__</h1>
<div class="help">Each cell is one layer (row, 0 at the bottom) and position (column): heads on its left half
(<span class="sw" style="background:#1f5fbf"></span>blue), neurons on its right half
(<span class="sw" style="background:#e8710a"></span>orange), each shaded on its own scale by Σ|score|
(node count when unscored). Hover a cell, token or image patch for its nodes; click one to highlight its position's
nodes (<span class="sw" style="background:#ff00ff"></span>); the aligned Q/G position of the other prompt lights up too.</div>
<div class="panels" id="panels"></div>
<div id="tip"></div>
<script>
const PANELS = __DATA__;
const CW = 18, CH = 22;
let selected = null;  // [modality, position]
function spanOf(p, pos){for(const s in p.spans){const [a,b]=p.spans[s]; if(pos>=a&&pos<b) return s;} return null;}
function cells(p){
  const out = {};
  for(const [l,pos,u,s] of p.heads){const k=l+','+pos; (out[k]=out[k]||{h:[],hv:0,n:0,nv:0,top:[]}).h.push([u,s]);
    out[k].hv += p.scored? Math.abs(s):1;}
  for(const k in p.neurons){const [c,v,top]=p.neurons[k]; const o=(out[k]=out[k]||{h:[],hv:0,n:0,nv:0,top:[]});
    o.n=c; o.nv=p.scored? v:c; o.top=top;}
  return out;
}
function fmt(s){return s===null||s===undefined? '': (s>=0?'+':'')+s.toPrecision(3);}
function describe(p, pos, layer){
  const span = spanOf(p,pos), reg = p.regions[pos];
  let t = p.modality+' prompt, position '+pos+' '+JSON.stringify(p.tokens[pos])+(span?' ('+span+')':'');
  if(reg) t += '\nimage patch: rows '+(reg[0]*100).toFixed(0)+'-'+(reg[2]*100).toFixed(0)+'%, columns '
    +(reg[1]*100).toFixed(0)+'-'+(reg[3]*100).toFixed(0)+'%';
  const cs = p._cells, layers = layer===undefined? [...Array(p.layers).keys()] : [layer];
  for(const l of layers){const c = cs[l+','+pos]; if(!c) continue;
    t += '\nlayer '+l+': '+c.h.length+' heads'+(c.h.length? ' ('+c.h.map(([u,s])=>'h'+u+(p.scored?' '+fmt(s):'')).join(', ')+')':'')
      +'; '+c.n+' neurons'+(c.top.length? ' (top: '+c.top.map(([u,s])=>'n'+u+(p.scored?' '+fmt(s):'')).join(', ')+')':'');}
  return t;
}
const tip = document.getElementById('tip');
function showTip(e, text){tip.textContent=text; tip.style.display='block';
  tip.style.left=Math.min(e.clientX+14, innerWidth-530)+'px'; tip.style.top=(e.clientY+14)+'px';}
function hideTip(){tip.style.display='none';}
function aligned(from, to, pos){  // same offset from the end of Q or G
  const s = spanOf(from,pos); if(s!=='Q'&&s!=='G') return null;
  const off = from.spans[s][1]-pos, [a,b] = to.spans[s], q = b-off; return q>=a? q:null;
}
function select(mod, pos){location.hash = 'select='+mod+':'+pos;}
function applyHash(){
  const m = /select=(text|image):(\d+)/.exec(location.hash);
  selected = m? [m[1], +m[2]] : null; render();
}
function selectedIn(p){
  if(!selected) return null;
  if(selected[0]===p.modality) return selected[1];
  const other = PANELS.find(q=>q.modality===selected[0]); return other? aligned(other,p,selected[1]) : null;
}
function build(p){
  p._cells = cells(p);
  let hmax=0, nmax=0; for(const k in p._cells){hmax=Math.max(hmax,p._cells[k].hv); nmax=Math.max(nmax,p._cells[k].nv);}
  p._hmax=hmax||1; p._nmax=nmax||1;
  const div = document.createElement('div'); div.className='panel'; p._div=div;
  div.innerHTML = '<h2>'+p.modality+' prompt (answer '+p.answer+')</h2><div class="repr"></div>';
  div.querySelector('.repr').textContent = p.circuit;
  const toks = document.createElement('div'); toks.className='tokens';
  p.tokens.forEach((t,i)=>{const s=document.createElement('span'); s.className='tok '+(spanOf(p,i)||'');
    s.textContent=t; s.dataset.pos=i; s.onclick=()=>select(p.modality,i);
    s.onmousemove=e=>showTip(e,describe(p,i)); s.onmouseleave=hideTip; toks.appendChild(s);});
  div.appendChild(toks);
  if(p.image){
    const w = document.createElement('div'); w.className='imgwrap';
    const img = document.createElement('img'); img.src=p.image; w.appendChild(img);
    for(const pos in p.regions){const [t,l,b,r]=p.regions[pos]; const d=document.createElement('div'); d.className='patch';
      d.dataset.pos=pos; d.style.cssText='top:'+t*100+'%;left:'+l*100+'%;height:'+(b-t)*100+'%;width:'+(r-l)*100+'%';
      d.onclick=()=>select(p.modality,+pos); d.onmousemove=e=>showTip(e,describe(p,+pos)); d.onmouseleave=hideTip;
      w.appendChild(d);}
    div.appendChild(w);
  }
  const T = p.tokens.length, W = T*CW+30, H = p.layers*CH+24, NS='http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS,'svg'); svg.setAttribute('width',W); svg.setAttribute('height',H);
  for(let l=0;l<p.layers;l++){const t=document.createElementNS(NS,'text'); t.setAttribute('x',0);
    t.setAttribute('y',(p.layers-1-l)*CH+CH-4); t.textContent='L'+l; svg.appendChild(t);}
  for(const s in p.spans){const [a,b]=p.spans[s]; const t=document.createElementNS(NS,'text');
    t.setAttribute('x',30+(a+b)/2*CW-4); t.setAttribute('y',p.layers*CH+14); t.textContent=s; svg.appendChild(t);
    const ln=document.createElementNS(NS,'line'); ln.setAttribute('x1',30+a*CW); ln.setAttribute('x2',30+a*CW);
    ln.setAttribute('y1',0); ln.setAttribute('y2',p.layers*CH); ln.setAttribute('stroke','#999'); ln.setAttribute('stroke-dasharray','2,2');
    svg.appendChild(ln);}
  p._rects=[];
  for(let pos=0;pos<T;pos++) for(let l=0;l<p.layers;l++){
    const c = p._cells[l+','+pos], x=30+pos*CW, y=(p.layers-1-l)*CH;
    const bg=document.createElementNS(NS,'rect'); bg.setAttribute('x',x); bg.setAttribute('y',y);
    bg.setAttribute('width',CW-1); bg.setAttribute('height',CH-1); bg.setAttribute('fill','#f4f4f4'); bg.setAttribute('class','cell');
    bg.onclick=()=>select(p.modality,pos); bg.onmousemove=e=>showTip(e,describe(p,pos,l)); bg.onmouseleave=hideTip;
    svg.appendChild(bg);
    if(!c) continue;
    for(const [half,v,max,rgb] of [[0,c.hv,p._hmax,'31,95,191'],[1,c.nv,p._nmax,'232,113,10']]){
      if(!v) continue;
      const r=document.createElementNS(NS,'rect'); r.setAttribute('x',x+half*(CW-1)/2); r.setAttribute('y',y);
      r.setAttribute('width',(CW-1)/2); r.setAttribute('height',CH-1); r.setAttribute('class','cell');
      r.dataset.rgb=rgb; r.dataset.alpha=(0.25+0.75*v/max).toFixed(3); r.dataset.pos=pos;
      r.onclick=()=>select(p.modality,pos); r.onmousemove=e=>showTip(e,describe(p,pos,l)); r.onmouseleave=hideTip;
      svg.appendChild(r); p._rects.push(r);}
  }
  const grid = document.createElement('div'); grid.style.overflowX = 'auto'; grid.appendChild(svg);
  div.appendChild(grid);
  return div;
}
function render(){
  for(const p of PANELS){
    const s = selectedIn(p);
    for(const r of p._rects) r.setAttribute('fill', +r.dataset.pos===s? '#ff00ff' : 'rgba('+r.dataset.rgb+','+r.dataset.alpha+')');
    p._div.querySelectorAll('.tok,.patch').forEach(e=>e.classList.toggle('sel', +e.dataset.pos===s));
  }
}
const root = document.getElementById('panels');
for(const p of PANELS) root.appendChild(build(p));
window.addEventListener('hashchange', applyHash);
applyHash();
</script>
</body></html>
"""
