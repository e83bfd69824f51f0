// A Hybrid Connections sender written with Microsoft's hyco-ws (URI built by hand: hyco-ws
// 1.0.5 hard-codes port 443). Env: RELAY, PATH_NAME (may carry a suffix), KEY_NAME, KEY,
// PROTOCOLS (comma-separated, optional), BYTES (size of the message to send, default 5).
// Prints one JSON line {protocol, replyBytes, replyOk} and exits 0 when the echo arrived.
'use strict';
const WebSocket = require('hyco-ws');

const base = `wss://${process.env.RELAY}/$hc/${process.env.PATH_NAME}`;
const token = WebSocket.createRelayToken(base, process.env.KEY_NAME, process.env.KEY);
const protocols = process.env.PROTOCOLS ? process.env.PROTOCOLS.split(',') : undefined;
const size = parseInt(process.env.BYTES || '5', 10);
const message = 'x'.repeat(size);
const ws = new WebSocket(`${base}?sb-hc-action=connect`, protocols, {
  headers: { ServiceBusAuthorization: token },
});
ws.on('open', () => ws.send(message));
ws.on('message', (data) => {
  const reply = String(data);
  console.log(JSON.stringify({
    protocol: ws.protocol || null,
    replyBytes: reply.length,
    replyOk: reply === 'echo:' + message,
  }));
  ws.close();
  process.exit(0);
});
ws.on('error', (e) => {
  console.error('sender error: ' + (e && e.message ? e.message : e));
  process.exit(2);
});
setTimeout(() => {
  console.error('sender: no reply within 30 s');
  process.exit(4);
}, 30000).unref();
