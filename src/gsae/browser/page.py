"""The page of `gsae serve`: plain HTML, CSS and JavaScript in one response, calling only the
server that sent it. Query parameters fill the form and run it, so a view can be linked
(?text=...&latent=5&token=3&prompt=...&alpha=8&run=1)."""

SERVE_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gsae serve</title><style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1000px;color:#222;padding:0 1em}
textarea{width:100%;height:5em}input[type=number]{width:7em}.note{color:#555;font-size:12px}
#tokens{font:14px/2 ui-monospace,monospace;white-space:pre-wrap;border:1px solid #ddd;padding:6px}
.tok{border-radius:2px;cursor:pointer}.tok.off{color:#aaa}.tok.chosen{outline:2px solid #333}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
.error{color:#b00}.out{font-family:ui-monospace,monospace;white-space:pre-wrap}
</style></head><body>
<h1>gsae serve</h1><p class="note" id="about"></p>
<h2>Read a text</h2>
<p><label>SAE <select id="sae"></select></label>
<label>latent <input id="latent" type="number" min="0" value="0"></label>
<label>colour by <select id="colour"><option value="value">activation</option>
<option value="effect">loss effect value*(d.g)</option></select></label></p>
<textarea id="text">The cat sat on the mat.</textarea>
<p><button id="read">Read</button> <span id="read-error" class="error"></span></p>
<div id="tokens"></div>
<p class="note">Each token is coloured by the chosen latent's activation under the SAE's
training-time selection (gradient-aware for a g-SAE, with g = dL/dx for the text's own next
tokens) or by its first-order loss effect value * (d_i . g) in nats (blue: lowers the loss,
red: raises it). Hover for exact values; click a token for its top latents. Grey tokens are
before skip_first, which the SAE was not trained on; the last token has no next token, so its
g is 0.</p>
<h3 id="top-title"></h3><table id="top"></table>
<h2>Steer a latent</h2>
<p><label>prompt <input id="prompt" size="40" value="The weather today is"></label>
<label>alpha <input id="alpha" type="number" step="any" value="10"></label>
<label>new tokens <input id="new_tokens" type="number" min="1" max="64" value="20"></label>
<button id="steer">Steer</button> <span id="steer-error" class="error"></span></p>
<p class="note">Greedy continuations with alpha * d_i (d_i the latent's unit decoder
direction) added to the hook's output from position skip_first on, and without.</p>
<table><tr><th>without</th><td class="out" id="clean" style="text-align:left"></td></tr>
<tr><th>with</th><td class="out" id="steered" style="text-align:left"></td></tr></table>
<script>
const $=id=>document.getElementById(id);let lastRead=null;
async function call(path,body){const r=await fetch(path,{method:'POST',
 headers:{'Content-Type':'application/json'},body:JSON.stringify(body)});
 const data=await r.json();if(!r.ok)throw new Error(data.error);return data;}
function colour(t,key,top){if(!t.encoded||!top)return '';const v=t[key]/top;
 const a=Math.min(1,Math.abs(v)).toFixed(2);
 return v>=0?`rgba(235,110,20,${a})`:`rgba(40,110,220,${a})`;}
function showTokens(){const key=$('colour').value,box=$('tokens');box.textContent='';
 if(!lastRead)return;
 const top=Math.max(0,...lastRead.tokens.filter(t=>t.encoded).map(t=>Math.abs(t[key])));
 lastRead.tokens.forEach((t,i)=>{const s=document.createElement('span');
  s.className='tok'+(t.encoded?'':' off');s.dataset.index=i;
  s.textContent=t.text.replace(/\\n/g,'\\u23ce');
  if(t.encoded){s.dataset.value=t.value;s.dataset.effect=t.effect;
   s.title=`activation ${t.value.toPrecision(4)}; loss effect ${t.effect.toPrecision(3)}`;
   s.style.background=colour(t,key,top);}else s.title='not encoded (before skip_first)';
  s.addEventListener('click',()=>showTop(i));box.append(s);});}
function showTop(i){const t=lastRead.tokens[i];
 document.querySelectorAll('.tok.chosen').forEach(s=>s.classList.remove('chosen'));
 $('tokens').children[i].classList.add('chosen');
 $('top-title').textContent=`Top latents of token ${i} (${JSON.stringify(t.text)})`;
 const rows=(t.top||[]).map(l=>`<tr data-latent="${l.latent}">`+
  `<td><a href="#" data-pick="${l.latent}">${l.latent}</a></td>`+
  `<td>${l.value.toPrecision(4)}</td><td>${l.effect.toPrecision(3)}</td></tr>`).join('');
 $('top').innerHTML='<tr><th>latent</th><th>activation</th><th>loss effect</th></tr>'+
  (t.encoded?rows:'<tr><td colspan=3>not encoded</td></tr>');
 $('top').querySelectorAll('a[data-pick]').forEach(a=>a.addEventListener('click',e=>{
  e.preventDefault();$('latent').value=a.dataset.pick;read(i);}));}
async function read(token){$('read-error').textContent='';try{
 lastRead=await call('/api/read',{text:$('text').value,sae:+$('sae').value,
  latent:+$('latent').value});
 showTokens();if(token!==undefined&&token!==null&&lastRead.tokens[token])showTop(token);
 }catch(e){$('read-error').textContent=e.message;}}
async function steer(){$('steer-error').textContent='';try{
 const r=await call('/api/steer',{prompt:$('prompt').value,sae:+$('sae').value,
  latent:+$('latent').value,alpha:+$('alpha').value,new_tokens:+$('new_tokens').value});
 $('clean').textContent=r.clean;$('steered').textContent=r.steered;
 }catch(e){$('steer-error').textContent=e.message;}}
$('read').addEventListener('click',()=>read());$('steer').addEventListener('click',steer);
$('colour').addEventListener('change',showTokens);
(async()=>{const info=await (await fetch('/api/info')).json();
 info.saes.forEach(s=>{const o=document.createElement('option');o.value=s.index;
  o.textContent=`${s.name} (${s.n_latents} latents, ${s.hook})`;$('sae').append(o);});
 $('about').textContent=`model ${info.model}; served from this machine`;
 const q=new URLSearchParams(location.search);
 for(const k of ['text','latent','sae','prompt','alpha','new_tokens','colour'])
  if(q.has(k))$(k).value=q.get(k);
 if(q.get('run')){await read(q.has('token')?+q.get('token'):null);
  if(q.has('prompt'))await steer();}
 document.body.dataset.ready='1';})();
</script></body></html>
"""
