// Nodemailer's smtp-server as a sink for the server benchmarks
// (bench/table.py): accepts every message and discards it, no logging,
// no AUTH, no reverse DNS lookup, STARTTLS with the given certificate,
// exits after LIFETIME seconds.
//
//   NODE_PATH=build/bench/node/node_modules node bench/sink_smtp_server.js PORT LIFETIME [CERT KEY]
'use strict'
const fs = require('node:fs')
const { SMTPServer } = require('smtp-server')

const [port, lifetime, cert, key] = process.argv.slice(2)
if (!port || !lifetime) {
  console.error('usage: sink_smtp_server.js PORT LIFETIME [CERT KEY]')
  process.exit(2)
}
const tls = cert ? { cert: fs.readFileSync(cert), key: fs.readFileSync(key) } : {}
const server = new SMTPServer({
  ...tls,
  name: 'smtp-server.localhost',
  logger: false,
  authOptional: true,
  disabledCommands: cert ? ['AUTH'] : ['AUTH', 'STARTTLS'],
  disableReverseLookup: true,
  onData (stream, session, callback) {
    stream.on('data', () => {})
    stream.on('end', () => callback())
  }
})
server.on('error', (err) => { console.error(err.message) })
server.listen(Number(port), '127.0.0.1', 1024)
setTimeout(() => process.exit(0), Number(lifetime) * 1000)
