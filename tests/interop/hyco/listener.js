// A Hybrid Connections listener written with Microsoft's hyco-ws, exactly as its README shows,
// except that the URI is built by hand (hyco-ws 1.0.5 hard-codes port 443).
// Env: RELAY (host:port), PATH_NAME, KEY_NAME, KEY. Prints "listening" once the control channel
// is open; echoes every message back prefixed with "echo:"; picks the last offered subprotocol.
'use strict';
const WebSocket = require('hyco-ws');

const base = `wss://${process.env.RELAY}/$hc/${process.env.PATH_NAME}`;
const server = WebSocket.createRelayedServer(
  {
    server: `${base}?sb-hc-action=listen`,
    token: () => WebSocket.createRelayToken(base, process.env.KEY_NAME, process.env.KEY),
    handleProtocols: (protocols, cb) => cb(true, protocols[protocols.length - 1]),
  },
  (ws) => {
    ws.on('message', (data) => ws.send('echo:' + data));
    ws.on('error', (e) => console.error('listener socket error: ' + e));
  }
);
server.on('listening', () => console.log('listening'));
server.on('error', (e) => console.error('listener error: ' + (e && e.message ? e.message : e)));
setTimeout(() => process.exit(3), 60000).unref();
