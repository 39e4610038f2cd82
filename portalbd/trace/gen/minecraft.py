"""minecraft workload: a flying-squid server with its world on the device, and bots.

Several mineflayer bots join, walk about, dig and place blocks, so the server
generates chunks and saves region files (`.mca`), `level.dat` and player
data to the world folder on the mounted device.  The Node packages
(~560 MB) are installed once into a cache outside the repository
(`$PORTALBD_MINECRAFT_CACHE`, default /var/cache/portalbd-minecraft).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from portalbd.launch import free_port
from portalbd.trace.gen.common import GIB, GenContext, GenError, log, mounted, run

DEFAULT_SIZE = 1 * GIB
PACKAGES = ("flying-squid@1.12.0", "mineflayer@4.25.0")
VERSION = "1.16.5"

SCRIPT = r"""
'use strict'
const mcServer = require('flying-squid')
const mineflayer = require('mineflayer')
const { Vec3 } = require('vec3')

const [worldFolder, portText, botsText, secondsText] = process.argv.slice(2)
const port = Number(portText), nbots = Number(botsText), seconds = Number(secondsText)
const VERSION = '__VERSION__'
const stats = { joined: 0, dug: 0, placed: 0, teleports: 0, errors: 0 }
setTimeout(() => { console.error('hard timeout'); process.exit(2) }, (seconds + 120) * 1000).unref()

const serv = mcServer.createMCServer({
  motd: 'portalbd trace', port, host: '127.0.0.1', 'max-players': nbots + 2, 'online-mode': false,
  logging: false, gameMode: 1, difficulty: 0, worldFolder,
  generation: { name: 'diamond_square', options: { worldHeight: 80, seed: 4242 } },
  kickTimeout: 30000, plugins: {}, modpe: false, 'view-distance': 5,
  'player-list-text': { header: 'portalbd', footer: 'trace' },
  'everybody-op': true, 'max-entities': 50, version: VERSION
})

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

async function joinBot (i) {
  // The server accepts connections a moment before it lets players in: retry.
  for (let attempt = 0; ; attempt++) {
    const bot = mineflayer.createBot({
      host: '127.0.0.1', port, username: 'bot' + i, version: VERSION
    })
    bot.on('error', () => { stats.errors++ })
    const ok = await new Promise((resolve) => {
      bot.once('spawn', () => resolve(true))
      bot.once('end', () => resolve(false))
    })
    if (ok) return bot
    if (attempt >= 10) throw new Error('bot' + i + ' could not join')
    await sleep(1000)
  }
}

async function runBot (i, until) {
  const bot = await joinBot(i)
  stats.joined++
  const Item = require('prismarine-item')(bot.registry)
  const dirt = bot.registry.itemsByName.dirt.id
  try { await bot.creative.setInventorySlot(36, new Item(dirt, 64)) } catch (e) { stats.errors++ }
  // Each bot explores its own direction, teleporting ahead now and then so the
  // server generates (and saves) fresh chunks, like players travelling.
  const heading = (i * Math.PI) / 2
  let step = 0
  while (Date.now() < until) {
    step++
    if (step % 3 === 0) {
      const p = bot.entity.position
      const x = Math.round(p.x - Math.sin(heading) * 96)
      const z = Math.round(p.z - Math.cos(heading) * 96)
      bot.chat('/tp ' + x + ' 90 ' + z)
      stats.teleports++
      await sleep(1500)
      continue
    }
    bot.look(heading + (Math.random() - 0.5), 0, true).catch(() => {})
    bot.setControlState('forward', true)
    bot.setControlState('sprint', true)
    bot.setControlState('jump', step % 2 === 0)
    await sleep(700)
    bot.clearControlStates()
    try {
      const below = bot.blockAt(bot.entity.position.offset(1, -1, 0).floored())
      if (below && below.name !== 'air' && bot.canDigBlock(below)) {
        await bot.dig(below, true)
        stats.dug++
      }
      const ref = bot.blockAt(bot.entity.position.offset(0, -1, 0).floored())
      if (ref && ref.name !== 'air') {
        await bot.equip(dirt, 'hand')
        bot.placeBlock(ref, new Vec3(0, 1, 0)).catch(() => {})  // reply may never come
        stats.placed++
      }
    } catch (e) { stats.errors++ }
  }
  bot.quit()
}

serv.once('listening', async () => {
  const until = Date.now() + seconds * 1000
  const bots = []
  for (let i = 0; i < nbots; i++) {
    bots.push(runBot(i, until).catch((e) => { console.error(String(e)); stats.errors++ }))
    await sleep(300)
  }
  await Promise.all(bots)
  await sleep(1000)
  if (serv.overworld && serv.overworld.waitSaving) await serv.overworld.waitSaving()
  await serv.quit('trace done')
  if (serv.overworld && serv.overworld.waitSaving) await serv.overworld.waitSaving()
  console.log(JSON.stringify(stats))
  process.exit(stats.joined > 0 ? 0 : 3)
})
""".replace("__VERSION__", VERSION)


def cache_dir() -> Path:
    return Path(os.environ.get("PORTALBD_MINECRAFT_CACHE", "/var/cache/portalbd-minecraft"))


def ensure_packages() -> Path:
    """node_modules with flying-squid and mineflayer, installed once into the cache."""
    cache = cache_dir()
    modules = cache / "node_modules"
    if (modules / "flying-squid").is_dir() and (modules / "mineflayer").is_dir():
        return modules
    if shutil.which("npm") is None or shutil.which("node") is None:
        raise GenError("minecraft needs node and npm (Node 20: see docs/traces.md)")
    cache.mkdir(parents=True, exist_ok=True)
    pkg = cache / "package.json"
    if not pkg.exists():
        pkg.write_text('{"name": "portalbd-minecraft-workload", "private": true}\n')
    log(f"npm install {' '.join(PACKAGES)} into {cache} (once)")
    run(["npm", "install", "--no-audit", "--no-fund", *PACKAGES], cwd=cache, timeout=1200)
    return modules


def workload(ctx: GenContext) -> None:
    modules = ensure_packages()
    bots, seconds = (2, 12) if ctx.quick else (4, 60)
    script = ctx.workdir / "minecraft.js"
    script.write_text(SCRIPT)
    run(["mkfs.ext4", "-F", "-q", str(ctx.device)])
    with mounted(ctx.device, ctx.workdir / "mnt") as mnt:
        world = mnt / "world"
        world.mkdir()
        env = dict(os.environ, NODE_PATH=str(modules))
        log(f"flying-squid {VERSION} with {bots} bots for {seconds}s")
        out = run(
            ["node", str(script), str(world), str(free_port()), str(bots), str(seconds)],
            env=env,
            cwd=cache_dir(),
            timeout=seconds + 180,
        )
        log(f"bots: {out.strip().splitlines()[-1] if out.strip() else '(no summary)'}")
        regions = list((world / "region").glob("*.mca"))
        if not regions:
            raise GenError(f"the server saved no region files under {world}")
        run(["sync", "-f", str(mnt)])
