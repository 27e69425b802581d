// Markdown for the chat page: the subset models write (headings, paragraphs, emphasis,
// inline and fenced code, lists, quotes, tables, rules, links), built as DOM nodes. Model
// output never becomes HTML: every piece of text is a text node, and links are kept only
// for http(s) and mailto addresses. A half-streamed answer renders too (an unclosed fence
// is a code block so far).
'use strict';

(function () {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function safeHref(url) {
    try {
      const u = new URL(url, window.location.href);
      return ['http:', 'https:', 'mailto:'].includes(u.protocol) ? u.href : null;
    } catch (_) {
      return null;
    }
  }

  // Inline spans: `code`, **strong**, __strong__, *em*, _em_, ~~del~~, [text](url), <url>.
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|~~([\s\S]+?)~~|\*([^\s*](?:[\s\S]*?[^\s*])?)\*|\b_([^\s_](?:[\s\S]*?[^\s_])?)_\b|\[([^\]\n]+)\]\(([^)\s]+)(?:\s+"[^"]*")?\)|<(https?:\/\/[^\s>]+)>/g;

  function inline(text, into) {
    // A regex of its own per call: the spans inside a span are read by a nested call.
    const re = new RegExp(INLINE.source, 'g');
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) lines(text.slice(last, m.index), into);
      if (m[1] !== undefined) {
        into.appendChild(el('code', null, m[2].replace(/^ (.*) $/, '$1')));
      } else if (m[3] !== undefined || m[4] !== undefined) {
        inline(m[3] !== undefined ? m[3] : m[4], into.appendChild(el('strong')));
      } else if (m[5] !== undefined) {
        inline(m[5], into.appendChild(el('del')));
      } else if (m[6] !== undefined || m[7] !== undefined) {
        inline(m[6] !== undefined ? m[6] : m[7], into.appendChild(el('em')));
      } else if (m[8] !== undefined) {
        const href = safeHref(m[9]);
        if (href) {
          const a = el('a');
          a.href = href;
          a.target = '_blank';
          a.rel = 'noopener noreferrer';
          inline(m[8], a);
          into.appendChild(a);
        } else {
          lines(m[0], into);
        }
      } else if (m[10] !== undefined) {
        const href = safeHref(m[10]);
        const a = el('a', null, m[10]);
        if (href) {
          a.href = href;
          a.target = '_blank';
          a.rel = 'noopener noreferrer';
        }
        into.appendChild(a);
      }
      last = re.lastIndex;
    }
    if (last < text.length) lines(text.slice(last), into);
  }

  // Text with its line breaks kept (a chat answer's single newlines are meant).
  function lines(text, into) {
    text.split('\n').forEach((part, i) => {
      if (i > 0) into.appendChild(document.createElement('br'));
      if (part) into.appendChild(document.createTextNode(part));
    });
  }

  function codeBlock(lang, code) {
    const box = el('div', 'code-block');
    const head = el('div', 'code-head');
    head.appendChild(el('span', 'code-lang', lang || 'code'));
    const copy = el('button', 'copy-code', 'Copy');
    copy.type = 'button';
    head.appendChild(copy);
    box.appendChild(head);
    const pre = el('pre');
    const c = el('code', null, code);
    if (lang) c.dataset.lang = lang;
    pre.appendChild(c);
    box.appendChild(pre);
    return box;
  }

  function cells(row) {
    let r = row.trim();
    if (r.startsWith('|')) r = r.slice(1);
    if (r.endsWith('|') && !r.endsWith('\\|')) r = r.slice(0, -1);
    return r.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, '|'));
  }

  function startsBlock(line, next) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line) || (line.includes('|') && next !== undefined && TABLE_SEP.test(next));
  }

  function blocks(src, into) {
    const L = src.replace(/\r\n?/g, '\n').split('\n');
    let i = 0;
    while (i < L.length) {
      const line = L[i];
      if (!line.trim()) {
        i++;
        continue;
      }
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i++;
        while (i < L.length && !L[i].trim().startsWith(fence)) body.push(L[i++]);
        i++; // the closing fence (or the end of a half-streamed answer)
        into.appendChild(codeBlock(m[2], body.join('\n')));
      } else if ((m = HEADING.exec(line))) {
        inline(m[2], into.appendChild(el('h' + m[1].length)));
        i++;
      } else if (RULE.test(line)) {
        into.appendChild(el('hr'));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < L.length && L[i].trim() && QUOTE.test(L[i])) body.push(L[i++].replace(QUOTE, ''));
        blocks(body.join('\n'), into.appendChild(el('blockquote')));
      } else if ((m = ITEM.exec(line))) {
        i = list(L, i, into);
      } else if (line.includes('|') && i + 1 < L.length && TABLE_SEP.test(L[i + 1])) {
        const table = el('table');
        const head = table.appendChild(el('thead')).appendChild(el('tr'));
        cells(line).forEach((c) => inline(c, head.appendChild(el('th'))));
        const body = table.appendChild(el('tbody'));
        i += 2;
        while (i < L.length && L[i].includes('|') && L[i].trim()) {
          const tr = body.appendChild(el('tr'));
          cells(L[i++]).forEach((c) => inline(c, tr.appendChild(el('td'))));
        }
        const wrap = el('div', 'table-wrap');
        wrap.appendChild(table);
        into.appendChild(wrap);
      } else {
        const para = [line];
        i++;
        while (i < L.length && L[i].trim() && !startsBlock(L[i], L[i + 1])) para.push(L[i++]);
        inline(para.join('\n'), into.appendChild(el('p')));
      }
    }
  }

  // A list from line `i`: items at the first item's indent; deeper or continuation lines
  // belong to the item above and are rendered as blocks of their own (nested lists).
  function list(L, i, into) {
    const first = ITEM.exec(L[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? 'ol' : 'ul');
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    let loose = false;
    const items = [];
    while (i < L.length) {
      const m = ITEM.exec(L[i]);
      if (m && m[1].length === indent && /\d/.test(m[2]) === ordered) {
        items.push([m[3]]);
        i++;
        continue;
      }
      if (!L[i].trim()) {
        // A blank line ends the list unless the next line goes on with it.
        const next = L[i + 1];
        const nm = next !== undefined ? ITEM.exec(next) : null;
        const goesOn = next !== undefined && ((nm && nm[1].length >= indent) ||
          (next.trim() && next.length - next.trimStart().length > indent));
        if (!goesOn) break;
        loose = true;
        items[items.length - 1].push('');
        i++;
        continue;
      }
      const lead = L[i].length - L[i].trimStart().length;
      if (m && lead < indent) break;
      if (!m && lead <= indent && startsBlock(L[i], L[i + 1])) break;
      items[items.length - 1].push(L[i].slice(Math.min(lead, indent + 2)));
      i++;
    }
    for (const lines_ of items) {
      const li = node.appendChild(el('li'));
      const sub = document.createDocumentFragment();
      blocks(lines_.join('\n'), sub);
      // A tight list's single paragraphs stand without their <p>.
      if (!loose) {
        for (const child of Array.from(sub.childNodes)) {
          if (child.tagName === 'P') {
            while (child.firstChild) li.appendChild(child.firstChild);
          } else {
            li.appendChild(child);
          }
        }
      } else {
        li.appendChild(sub);
      }
    }
    into.appendChild(node);
    return i;
  }

  window.renderMarkdown = function (text) {
    const frag = document.createDocumentFragment();
    blocks(text || '', frag);
    return frag;
  };
})();
