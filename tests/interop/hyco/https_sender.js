// HTTP requests through the relay as Microsoft's hyco-https sender example makes them: node's
// https with the SAS token in ServiceBusAuthorization (or sb-hc-token), over one kept-alive
// connection. Env: RELAY (host:port), PATH_NAME, KEY_NAME, KEY. Prints one JSON line with what
// each request got: {name: {status, message, headers, body}}; bodies of POSTs as their length
// and whether they are the upload twice over.
'use strict';
const https = require('https');
const hyco = require('hyco-https');

const [host, port] = process.env.RELAY.split(':');
const path = process.env.PATH_NAME;
const token = (p) => hyco.createRelayToken(hyco.createRelayHttpsUri(process.env.RELAY, p), process.env.KEY_NAME, process.env.KEY);
const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });

function request(name, options, body) {
  return new Promise((resolve, reject) => {
    const req = https.request({ host, port, agent, ...options }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const data = Buffer.concat(chunks);
        const out = { status: res.statusCode, message: res.statusMessage, headers: res.headers };
        if (body) {
          out.bodyLength = data.length;
          out.echoedTwice = data.equals(Buffer.concat([body, body]));
        } else {
          out.body = data.toString();
        }
        resolve([name, out]);
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

(async () => {
  const upload = Buffer.alloc(200 * 1024);
  for (let i = 0; i < upload.length; i++) upload[i] = (i * 31) % 251;
  const results = {};
  const auth = { ServiceBusAuthorization: token(path) };
  for (const [name, out] of [
    await request('get', {
      path: `/${path}/sub/dir?foo=bar&name=hello%20world&flag&sb-hc-id=client-1`,
      headers: { ...auth, 'X-Custom': 'yes' },
    }),
    await request('post', { method: 'POST', path: `/${path}/upload`, headers: auth }, upload),
    await request('teapot', { path: `/${path}/teapot`, headers: auth }),
    await request('query_token', {
      path: `/${path}?sb-hc-token=${encodeURIComponent(token(path))}&kept=1`,
    }),
    await request('bad_token', {
      path: `/${path}`,
      headers: { ServiceBusAuthorization: token(path).replace(/sig=[^&]+/, 'sig=AAAA') },
    }),
    await request('no_listener', {
      path: `/${path}-nobody`,
      headers: { ServiceBusAuthorization: token(`${path}-nobody`) },
    }),
  ]) {
    results[name] = out;
  }
  console.log(JSON.stringify(results));
  agent.destroy();
})().catch((e) => {
  console.error('sender error: ' + (e && e.message ? e.message : e));
  process.exit(2);
});
