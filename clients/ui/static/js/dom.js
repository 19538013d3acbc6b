// Small DOM helpers shared by the panels: $ (an element by id), el (build an element), fmt (a signed number).

export function $(id) { return document.getElementById(id); }
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
export const fmt = (v, d = 4) => (v >= 0 ? "+" : "") + Number(v).toFixed(d);
