// Make one host's firehose ahead of a benchmark run with the reference implementation itself.
//
//   node gen.mjs --out DIR --host 0 --accounts 100 --commits 50 [--p256-every 4] [--text-bytes 120]
//                [--modules-dir ~/.cache/skyrelay-refpds]
//
// Every account starts as the reference PDS starts one (its Sequencer.sequenceAccountCreation):
// #identity, #account (active), an empty initial #commit (since: null) and #sync. Then --commits
// one-op commits: 92% creates (65% posts, 35% likes), 5% updates and 3% deletes of one of the
// account's own records (a create when it has none). Commits are built by @atproto/repo
// (Repo.formatCommit: Sync 1.1 covering proofs) with the PDS's own op list (prev CIDs for updates
// and deletes, prevData), and every event body is made by the PDS's own formatSeq* functions,
// then framed as its subscribeRepos does (xrpc-server MessageFrame: {seq, time, ...event}).
// Keys: K-256, every --p256-every'th account P-256 (0: none).
//
// The accounts' frames are interleaved as a busy PDS emits them: a random merge in which each
// account's frames stay in order and many accounts are active at once. Seqs run 1, 2, ... in
// file order. Writes, in DIR:
//   host-H.frames      the frames, each as a 4-byte big-endian length and the frame bytes
//   host-H.index.json  [[seq, type, did, rev], ...] in file order (rev "" for #identity/#account)
//   host-H.accounts.json  [{"did", "signingKey" (did:key), "handle"}, ...]
// and prints one JSON line of totals. Needs node >= 22 and the packages of scripts/refpds.
import { randomBytes } from 'node:crypto'
import { writeFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { homedir } from 'node:os'
import { dirname, join } from 'node:path'
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'

const PLC_ALPHABET = 'abcdefghijklmnopqrstuvwxyz234567'

const { values: opt } = parseArgs({
  options: {
    out: { type: 'string' },
    host: { type: 'string', default: '0' },
    accounts: { type: 'string', default: '100' },
    commits: { type: 'string', default: '50' },
    'p256-every': { type: 'string', default: '4' },
    'text-bytes': { type: 'string', default: '120' },
    'modules-dir': {
      type: 'string',
      default: process.env.SKYRELAY_REFPDS_DIR || join(homedir(), '.cache', 'skyrelay-refpds'),
    },
  },
})
if (!opt.out) throw new Error('--out DIR is required')
const host = Number(opt.host)
const accountCount = Number(opt.accounts)
const commitCount = Number(opt.commits)
const p256Every = Number(opt['p256-every'])
const textBytes = Number(opt['text-bytes'])

const require = createRequire(join(opt['modules-dir'], 'package.json'))
const load = (name) => import(pathToFileURL(require.resolve(name)).href)
const repoLib = await load('@atproto/repo')
const crypto = await load('@atproto/crypto')
const { MessageFrame } = await load('@atproto/xrpc-server')
const { decode: cborDecode } = await load('@atproto/lex-cbor')
const { TID } = await load('@atproto/common-web')
// The PDS's own event formatting (not exported by the package: imported by its file).
const pdsDir = dirname(dirname(require.resolve('@atproto/pds')))
const events = await import(pathToFileURL(join(pdsDir, 'dist', 'sequencer', 'events.js')).href)
const { Repo, MemoryBlockstore, WriteOpAction } = repoLib

const pick = (items) => items[Math.floor(Math.random() * items.length)]
const newDid = () =>
  'did:plc:' + Array.from(randomBytes(24), (b) => PLC_ALPHABET[b % 32]).join('')
const text = () => {
  const words = []
  let size = 0
  const target = Math.floor(textBytes * (0.5 + Math.random()))
  while (size < target) {
    const word = randomBytes(3 + Math.floor(Math.random() * 5)).toString('base64url')
    words.push(word)
    size += word.length + 1
  }
  return words.join(' ')
}
const now = () => new Date().toISOString()

// One account's events in order: [type, event object (as the PDS stores it), rev].
async function account(index) {
  const did = newDid()
  const handle = `h${host}-u${index}.test`
  const usesP256 = p256Every > 0 && index % p256Every === p256Every - 1
  const key = usesP256
    ? await crypto.P256Keypair.create({ exportable: true })
    : await crypto.Secp256k1Keypair.create({ exportable: true })
  const storage = new MemoryBlockstore()
  const out = []
  const push = (type, seqEvt, rev) => out.push([type, cborDecode(seqEvt.event), rev])

  // Sequencer.sequenceAccountCreation after ActorStore's createRepo([]).
  const init = await Repo.formatInitCommit(storage, did, key, [])
  await storage.applyCommit(init)
  const initData = { ...init, ops: [], prevData: null }
  push('#identity', await events.formatSeqIdentityEvt(did, handle), '')
  push('#account', await events.formatSeqAccountEvt(did, 'active'), '')
  push('#commit', await events.formatSeqCommit(did, initData), init.rev)
  push('#sync', await events.formatSeqSyncEvt(did, events.syncEvtDataFromCommit(initData)), init.rev)

  let repo = await Repo.load(storage, init.cid)
  const records = new Map() // path -> record CID (the PDS's record index)
  const posts = [] // {uri, cid} of this account's posts, for likes
  for (let i = 0; i < commitCount; i++) {
    const roll = Math.random()
    const postPaths = [...records.keys()].filter((p) => p.startsWith('app.bsky.feed.post/'))
    let write
    if (roll >= 0.92 && roll < 0.97 && postPaths.length > 0) {
      const [collection, rkey] = pick(postPaths).split('/')
      write = { action: WriteOpAction.Update, collection, rkey, record: post() }
    } else if (roll >= 0.97 && records.size > 0) {
      const [collection, rkey] = pick([...records.keys()]).split('/')
      write = { action: WriteOpAction.Delete, collection, rkey }
    } else if (Math.random() < 0.65 || posts.length === 0) {
      write = { action: WriteOpAction.Create, collection: 'app.bsky.feed.post', rkey: TID.nextStr(), record: post() }
    } else {
      const subject = pick(posts)
      const record = { $type: 'app.bsky.feed.like', subject, createdAt: now() }
      write = { action: WriteOpAction.Create, collection: 'app.bsky.feed.like', rkey: TID.nextStr(), record }
    }
    const path = `${write.collection}/${write.rkey}`
    const prevData = repo.commit.data
    const commit = await repo.formatCommit(write, key)
    // As ActorStore's formatCommit: the op with the record's previous CID, and the record's block
    // in relevantBlocks even when the diff did not carry it.
    const cidOfRecord = write.action === WriteOpAction.Delete ? null : await recordCid(write.record)
    const op = { action: write.action, path, cid: cidOfRecord }
    if (records.has(path)) op.prev = records.get(path)
    if (cidOfRecord && !commit.relevantBlocks.has(cidOfRecord)) {
      const { blocks } = await storage.getBlocks([cidOfRecord])
      commit.relevantBlocks.addMap(blocks)
    }
    const data = { ...commit, ops: [op], prevData }
    repo = await repo.applyCommit(commit)
    if (write.action === WriteOpAction.Delete) {
      records.delete(path)
      const gone = posts.findIndex((p) => p.uri.endsWith('/' + path))
      if (gone >= 0) posts.splice(gone, 1)
    } else {
      records.set(path, cidOfRecord)
      if (write.action === WriteOpAction.Create && write.collection === 'app.bsky.feed.post') {
        posts.push({ uri: `at://${did}/${path}`, cid: cidOfRecord.toString() })
      }
    }
    push('#commit', await events.formatSeqCommit(did, data), commit.rev)
  }
  return { did, handle, signingKey: key.did(), events: out }
}

function post() {
  return { $type: 'app.bsky.feed.post', text: text(), langs: ['en'], createdAt: now() }
}

async function recordCid(record) {
  const blocks = new repoLib.BlockMap()
  return blocks.add(record)
}

const accounts = []
for (let i = 0; i < accountCount; i++) accounts.push(await account(i))

// A random merge: the next frame comes from an account chosen with weight = its frames left.
const cursors = accounts.map(() => 0)
const left = accounts.map((a) => a.events.length)
let remaining = left.reduce((a, b) => a + b, 0)
const chunks = []
const index = []
let seq = 0
let bytes = 0
while (remaining > 0) {
  let r = Math.floor(Math.random() * remaining)
  let a = 0
  while (r >= left[a]) r -= left[a++]
  const [type, evt, rev] = accounts[a].events[cursors[a]++]
  left[a]--
  remaining--
  seq++
  const frame = new MessageFrame({ seq, time: now(), ...evt }, { type }).toBytes()
  const head = Buffer.alloc(4)
  head.writeUInt32BE(frame.length)
  chunks.push(head, frame)
  bytes += frame.length
  index.push([seq, type, accounts[a].did, rev])
}
await writeFile(join(opt.out, `host-${host}.frames`), Buffer.concat(chunks))
await writeFile(join(opt.out, `host-${host}.index.json`), JSON.stringify(index))
const summary = accounts.map(({ did, handle, signingKey }) => ({ did, handle, signingKey }))
await writeFile(join(opt.out, `host-${host}.accounts.json`), JSON.stringify(summary))
console.log(JSON.stringify({ host, accounts: accountCount, frames: seq, bytes }))
