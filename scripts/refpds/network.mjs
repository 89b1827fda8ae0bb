// Run a PLC directory and N reference atproto PDSes on loopback, wired like @atproto/dev-env's
// TestNetworkNoAppView, and print one JSON line when they all serve:
//
//   {"plc": "http://localhost:2582", "pds": ["http://localhost:2583"], "adminPassword": "...", "dataDir": "..."}
//
// Needs node >= 22.19 and the packages that install.sh puts in $SKYRELAY_REFPDS_DIR (or --modules-dir).
// Every server listens on 127.0.0.1 only. Stops cleanly on SIGTERM, SIGINT, or when stdin closes (so a
// parent that dies takes the network with it); --ignore-stdin turns the last off.
//
// Options (each also read from the environment variable in brackets):
//   --plc-port N          port of the PLC started here (2582) [SKYRELAY_REFPDS_PLC_PORT]
//   --plc-url URL         use this running PLC instead of starting one [SKYRELAY_REFPDS_PLC_URL]
//   --pds-ports A,B,...   one PDS per port (2583) [SKYRELAY_REFPDS_PDS_PORTS]
//   --crawlers URL,...    relays each PDS asks to crawl it; loopback URLs only [SKYRELAY_REFPDS_CRAWLERS]
//   --admin-password PW   admin password of every PDS (random) [SKYRELAY_REFPDS_ADMIN_PASSWORD]
//   --data-dir DIR        PDS data lives in DIR/pds-PORT and is kept; default a temp dir, removed on
//                         exit [SKYRELAY_REFPDS_DATA_DIR]
//   --pds-per-process     run each PDS in a child process of its own (uses more cores)
//   --modules-dir DIR     folder holding node_modules [SKYRELAY_REFPDS_DIR, ~/.cache/skyrelay-refpds]
//   --ignore-stdin        do not stop when stdin closes
//
// PDS logging stays off unless LOG_ENABLED=true; it then goes to stderr (LOG_DESTINATION), since stdout
// carries only the ready line.
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { homedir, tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'

const LOOPBACK_HOST = '127.0.0.1'
const LOOPBACK_NAMES = new Set(['localhost', '127.0.0.1', '[::1]'])
const CHILD_READY_TIMEOUT_MS = 60_000

function readOptions() {
  const env = process.env
  const { values } = parseArgs({
    options: {
      'plc-port': { type: 'string', default: env.SKYRELAY_REFPDS_PLC_PORT ?? '2582' },
      'plc-url': { type: 'string', default: env.SKYRELAY_REFPDS_PLC_URL ?? '' },
      'pds-ports': { type: 'string', default: env.SKYRELAY_REFPDS_PDS_PORTS ?? '2583' },
      crawlers: { type: 'string', default: env.SKYRELAY_REFPDS_CRAWLERS ?? '' },
      'admin-password': { type: 'string', default: env.SKYRELAY_REFPDS_ADMIN_PASSWORD ?? '' },
      'data-dir': { type: 'string', default: env.SKYRELAY_REFPDS_DATA_DIR ?? '' },
      'pds-per-process': { type: 'boolean', default: false },
      'modules-dir': {
        type: 'string',
        default: env.SKYRELAY_REFPDS_DIR || join(homedir(), '.cache', 'skyrelay-refpds'),
      },
      'ignore-stdin': { type: 'boolean', default: false },
    },
  })
  const errors = []
  const port = (text, what) => {
    const n = Number(text)
    if (!Number.isInteger(n) || n < 1 || n > 65535) errors.push(`${what}: not a port: ${text}`)
    return n
  }
  const list = (text) => text.split(',').map((s) => s.trim()).filter(Boolean)
  const loopbackUrl = (url, what) => {
    let host = null
    try {
      host = new URL(url).hostname
    } catch {
      errors.push(`${what}: not a URL: ${url}`)
      return
    }
    if (!LOOPBACK_NAMES.has(host)) errors.push(`${what}: not a loopback URL: ${url}`)
  }
  const crawlers = list(values.crawlers)
  for (const url of crawlers) loopbackUrl(url, '--crawlers')
  const plcUrl = values['plc-url']
  if (plcUrl) loopbackUrl(plcUrl, '--plc-url')
  const options = {
    plcPort: plcUrl ? null : port(values['plc-port'], '--plc-port'),
    plcUrl,
    pdsPorts: list(values['pds-ports']).map((p) => port(p, '--pds-ports')),
    crawlers,
    adminPassword: values['admin-password'] || randomBytes(12).toString('hex'),
    dataDir: values['data-dir'],
    pdsPerProcess: values['pds-per-process'],
    modulesDir: values['modules-dir'],
    ignoreStdin: values['ignore-stdin'],
  }
  if (options.pdsPorts.length === 0) errors.push('--pds-ports: give at least one port')
  if (errors.length) {
    for (const e of errors) console.error(`network.mjs: ${e}`)
    process.exit(2)
  }
  return options
}

// The installed packages live outside this repo: resolve them from the modules folder.
async function importFrom(modulesDir, name) {
  const require = createRequire(join(modulesDir, 'package.json'))
  return import(pathToFileURL(require.resolve(name)).href)
}

// PlcServer.start() and PDS.start() call app.listen(port) with no host, i.e. every interface.
function listenOnLoopback(app) {
  const listen = app.listen
  app.listen = (port, ...rest) => listen.call(app, port, LOOPBACK_HOST, ...rest)
}

// Handles are resolved among this process's PDSes only: never through DNS or another host.
function resolveHandlesLocally(pds, peers) {
  pds.ctx.idResolver.handle.resolve = async (handle) => {
    for (const peer of peers) {
      const account = await peer.ctx.accountManager.getAccount(handle)
      if (account) return account.did
    }
    return undefined
  }
}

async function startPlc(modulesDir, port) {
  const { Database, PlcServer } = (await importFrom(modulesDir, '@did-plc/server')).default
  const server = PlcServer.create({ db: Database.mock(), port })
  listenOnLoopback(server.app)
  await server.start()
  return { url: `http://localhost:${port}`, stop: () => server.destroy() }
}

async function startPdses(options, plcUrl, dataDir) {
  const { PDS } = await importFrom(options.modulesDir, '@atproto/pds')
  const { Secp256k1Keypair } = await importFrom(options.modulesDir, '@atproto/crypto')
  const servers = []
  try {
    for (const port of options.pdsPorts) {
      const dir = join(dataDir, `pds-${port}`)
      await mkdir(dir, { recursive: true })
      const rotationKey = await Secp256k1Keypair.create({ exportable: true })
      const recoveryKey = await Secp256k1Keypair.create()
      const pds = await PDS.fromEnv({
        devMode: true,
        hostname: 'localhost',
        port,
        dataDirectory: dir,
        blobstoreDiskLocation: join(dir, 'blobs'),
        didPlcUrl: plcUrl,
        recoveryDidKey: recoveryKey.did(),
        plcRotationKeyK256PrivateKeyHex: Buffer.from(await rotationKey.export()).toString('hex'),
        adminPassword: options.adminPassword,
        jwtSecret: randomBytes(16).toString('hex'),
        serviceHandleDomains: ['.test'],
        inviteRequired: false,
        disableSsrfProtection: true,
        crawlers: options.crawlers,
      })
      servers.push(pds)
      listenOnLoopback(pds.app)
      await pds.start()
    }
  } catch (err) {
    await Promise.allSettled(servers.map((pds) => pds.destroy()))
    throw err
  }
  for (const pds of servers) resolveHandlesLocally(pds, servers)
  return {
    urls: options.pdsPorts.map((port) => `http://localhost:${port}`),
    stop: () => Promise.all(servers.map((pds) => pds.destroy())),
  }
}

// --pds-per-process: one child (this script, with --plc-url and one port) per PDS.
async function startPdsChildren(options, plcUrl, dataDir) {
  const children = []
  let stopped = false
  const stop = () => {
    stopped = true
    return Promise.all(
      children.map(async (child) => {
        if (child.exitCode !== null || child.signalCode !== null) return
        child.kill('SIGTERM')
        await once(child, 'exit')
      }),
    )
  }
  const startChild = async (port) => {
    const args = [
      process.argv[1],
      '--plc-url', plcUrl,
      '--pds-ports', String(port),
      '--admin-password', options.adminPassword,
      '--data-dir', dataDir,
      '--modules-dir', options.modulesDir,
    ]
    if (options.crawlers.length) args.push('--crawlers', options.crawlers.join(','))
    // The child's stdin is a pipe from us: it stops by itself if we die.
    const child = spawn(process.execPath, args, { stdio: ['pipe', 'pipe', 'inherit'] })
    children.push(child)
    const lines = createInterface({ input: child.stdout })
    const ready = await Promise.race([
      once(lines, 'line').then(([line]) => JSON.parse(line)),
      once(child, 'exit').then(([code]) => Promise.reject(new Error(`PDS child on port ${port} exited (${code})`))),
      new Promise((_, reject) =>
        setTimeout(() => reject(new Error(`PDS child on port ${port} not ready in time`)), CHILD_READY_TIMEOUT_MS).unref(),
      ),
    ])
    lines.on('line', (line) => process.stderr.write(`pds ${port}: ${line}\n`))
    // A network that lost a PDS is broken: stop all of it, loudly.
    child.once('exit', (code, signal) => {
      if (stopped) return
      console.error(`network.mjs: PDS child on port ${port} died (${code ?? signal}), stopping`)
      process.exitCode = 1
      process.kill(process.pid, 'SIGTERM')
    })
    if (ready.pds?.[0] !== `http://localhost:${port}`) {
      throw new Error(`unexpected ready line from PDS child: ${JSON.stringify(ready)}`)
    }
  }
  try {
    await Promise.all(options.pdsPorts.map(startChild))
  } catch (err) {
    await stop()
    throw err
  }
  return { urls: options.pdsPorts.map((port) => `http://localhost:${port}`), stop }
}

async function main() {
  const options = readOptions()
  if (process.env.LOG_ENABLED && !process.env.LOG_DESTINATION) process.env.LOG_DESTINATION = '/dev/stderr'

  let ownedDataDir = null // a temp dir made here, removed on exit
  const running = [] // stopped in reverse order of starting
  let stopping = null
  const shutdown = (code) => {
    stopping ??= (async () => {
      for (const service of [...running].reverse()) {
        try {
          await service.stop()
        } catch (err) {
          console.error('network.mjs: error while stopping:', err)
        }
      }
      if (ownedDataDir) await rm(ownedDataDir, { recursive: true, force: true })
      process.exit(process.exitCode || code)
    })()
    return stopping
  }
  process.on('SIGTERM', () => shutdown(0))
  process.on('SIGINT', () => shutdown(0))
  if (!options.ignoreStdin) {
    process.stdin.on('end', () => shutdown(0))
    process.stdin.on('error', () => shutdown(0))
    process.stdin.resume()
  }

  try {
    let dataDir = options.dataDir
    if (!dataDir) {
      ownedDataDir = await mkdtemp(join(tmpdir(), 'skyrelay-refpds-'))
      dataDir = ownedDataDir
    }
    let plcUrl = options.plcUrl
    if (!plcUrl) {
      const plc = await startPlc(options.modulesDir, options.plcPort)
      running.push(plc)
      plcUrl = plc.url
    }
    const start = options.pdsPerProcess && options.pdsPorts.length > 1 ? startPdsChildren : startPdses
    const pdses = await start(options, plcUrl, dataDir)
    running.push(pdses)
    if (stopping) return
    const ready = { plc: plcUrl, pds: pdses.urls, adminPassword: options.adminPassword, dataDir }
    process.stdout.write(`${JSON.stringify(ready)}\n`)
  } catch (err) {
    console.error('network.mjs: failed to start:', err)
    await shutdown(1)
  }
}

await main()
