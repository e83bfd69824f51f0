// An HTTP listener written with Microsoft's hyco-https, as its README shows, except that the URI
// is built by hand (hyco-https 1.4.5 hard-codes port 443). Env: RELAY (host:port), PATH_NAME,
// KEY_NAME, KEY. Prints "listening" once the control channel is open. Answers a POST with its
// body twice over (so a large upload gets a larger answer), a path holding "teapot" with
// 418 "Short And Stout", anything else with JSON of what it received.
'use strict';
const https = require('hyco-https');

const base = `wss://${process.env.RELAY}/$hc/${process.env.PATH_NAME}`;
const server = https.createRelayedServer(
  {
    server: `${base}?sb-hc-action=listen`,
    token: () => https.createRelayToken(base, process.env.KEY_NAME, process.env.KEY),
  },
  (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(Buffer.from(c)));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      if (req.url.includes('teapot')) {
        res.writeHead(418, 'Short And Stout', { 'Content-Type': 'text/plain' });
        res.end('tea');
      } else if (req.method === 'POST') {
        res.setHeader('Content-Type', 'application/octet-stream');
        res.setHeader('X-Received', body.length);
        res.end(Buffer.concat([body, body]));
      } else {
        res.setHeader('Content-Type', 'application/json');
        res.end(JSON.stringify({ method: req.method, url: req.url, headers: req.headers }));
      }
    });
  }
);
server.listen();
server.on('listening', () => console.log('listening'));
server.on('error', (e) => console.error('listener error: ' + (e && e.message ? e.message : e)));
setTimeout(() => process.exit(3), 60000).unref();
