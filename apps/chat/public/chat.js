// apps/chat/public/chat.js: the browser side of apps/chat: one WebSocket to /ws/ROOM?nick=NAME,
// JSON messages both ways (see app.lua for the format). No build step, no library.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  let ws = null;

  function line(cls, text, who) {
    const li = document.createElement('li');
    li.className = cls;
    if (who) {
      const b = document.createElement('b');
      b.textContent = who + ': ';
      li.appendChild(b);
    }
    li.appendChild(document.createTextNode(text));
    $('log').appendChild(li);
    li.scrollIntoView({ block: 'end' });
  }

  function show(m) {
    if (m.type === 'history') {
      (Array.isArray(m.messages) ? m.messages : []).forEach(show);
      line('notice', 'you joined #' + m.room);
    } else if (m.type === 'message') {
      line('message', m.text, m.nick);
    } else if (m.type === 'join') {
      line('notice', m.nick + ' joined (' + m.members + ' here)');
    } else if (m.type === 'leave') {
      line('notice', m.nick + ' left (' + m.members + ' here)');
    } else if (m.type === 'error') {
      line('error', m.text);
    }
  }

  $('join').addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (ws) ws.close(1000, 'changing room');
    $('log').textContent = '';
    const nick = $('nick').value.trim(), room = $('room').value.trim() || 'lobby';
    const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
    ws = new WebSocket(scheme + location.host + '/ws/' + encodeURIComponent(room) +
                       '?nick=' + encodeURIComponent(nick));
    $('status').textContent = 'connecting…';
    ws.onopen = () => {
      $('status').textContent = 'connected to #' + room + ' as ' + nick;
      $('say').hidden = false;
      $('text').focus();
    };
    ws.onmessage = (ev) => show(JSON.parse(ev.data));
    ws.onclose = (ev) => {
      $('status').textContent = 'disconnected (' + ev.code + (ev.reason ? ' ' + ev.reason : '') + ')';
      $('say').hidden = true;
    };
  });

  $('say').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = $('text').value;
    if (!text || !ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({ type: 'message', text: text }));
    $('text').value = '';
  });
})();
