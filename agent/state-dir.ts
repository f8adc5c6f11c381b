// The agent's state directory: the pending record (state.json, replaced atomically), the append-only
// history (history.jsonl, fsynced), GC roots for trial systems, per-run switch output, and the lock
// that lets one process at a time act on all of it.

import { spawnSync } from 'node:child_process';
import { closeSync, constants, fstatSync, fsyncSync, ftruncateSync, mkdirSync, openSync, readFileSync, readSync, renameSync, unlinkSync, writeSync } from 'node:fs';
import { readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { SnapbackError, describeIssues } from '../shared/errors.ts';
import { historyEntrySchema, type HistoryEntry } from '../shared/model.ts';
import { stateSchema, type State } from './lifecycle.ts';

// The state file is ours, but it is read after crashes, full disks and upgrades: a record that does
// not fit its phase stops the agent (state-corrupt) rather than being acted on.
const stateFileSchema = z.object({ version: z.literal(1), state: stateSchema });

export class StateDir {
  readonly root: string;
  readonly stateFile: string;
  readonly historyFile: string;

  constructor(root: string) {
    this.root = root;
    this.stateFile = join(root, 'state.json');
    this.historyFile = join(root, 'history.jsonl');
  }

  /** Creates the directory if needed. Does not write any file. */
  ensure(): void {
    mkdirSync(this.root, { recursive: true, mode: 0o700 });
    mkdirSync(this.gcRootDir, { recursive: true, mode: 0o700 });
    mkdirSync(this.runsDir, { recursive: true, mode: 0o700 });
  }

  get gcRootDir(): string {
    return join(this.root, 'gcroots');
  }
  get runsDir(): string {
    return join(this.root, 'runs');
  }
  gcRoot(id: string): string {
    return join(this.gcRootDir, id);
  }
  runDir(key: string): string {
    return join(this.runsDir, key);
  }

  /** The persisted state; a missing file is a fresh agent, an unreadable one stops the agent. */
  load(): State {
    let text: string;
    try {
      text = readFileSync(this.stateFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { phase: 'idle' };
      throw new SnapbackError('state-corrupt', `cannot read ${this.stateFile}: ${(err as Error).message}`);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      throw new SnapbackError(
        'state-corrupt',
        `${this.stateFile} is not valid JSON (${(err as Error).message}); the agent will not touch the system until an operator inspects it`,
      );
    }
    const result = stateFileSchema.safeParse(parsed);
    if (!result.success) {
      const problems = describeIssues(result.error).slice(0, 3).join('; ');
      throw new SnapbackError(
        'state-corrupt',
        `${this.stateFile} does not hold a valid state (${problems}); the agent will not touch the system until an operator inspects it`,
      );
    }
    return result.data.state;
  }

  /** temp file, fsync, rename, fsync dir: after a crash the file is the old or the new state, never half. */
  save(state: State): void {
    const tmp = `${this.stateFile}.tmp`;
    try {
      writeDurably(tmp, JSON.stringify({ version: 1, state }, null, 2) + '\n', 'w');
      renameSync(tmp, this.stateFile);
      fsyncDir(this.root);
    } catch (err) {
      try {
        unlinkSync(tmp);
      } catch {}
      throw new SnapbackError('state-unwritable', `cannot write ${this.stateFile}: ${(err as Error).message}`);
    }
  }

  /** Proves the directory takes a durable write before anything changes on the system. */
  probeWritable(): void {
    const probe = join(this.root, '.write-probe');
    try {
      writeDurably(probe, 'ok\n', 'w');
      unlinkSync(probe);
    } catch (err) {
      try {
        unlinkSync(probe);
      } catch {}
      throw new SnapbackError('state-unwritable', `the state directory ${this.root} is not writable: ${(err as Error).message}`);
    }
  }

  writable(): boolean {
    try {
      this.probeWritable();
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Appends one line. A line torn by a short write (a full disk) is ended first, so it can never
   * swallow the entry after it; readHistory skips the torn line.
   */
  appendHistory(entry: HistoryEntry): void {
    const fd = openSync(this.historyFile, constants.O_RDWR | constants.O_CREAT | constants.O_APPEND, 0o600);
    try {
      const { size } = fstatSync(fd);
      const last = Buffer.alloc(1);
      const torn = size > 0 && readSync(fd, last, 0, 1, size - 1) === 1 && last[0] !== 0x0a;
      writeAll(fd, Buffer.from((torn ? '\n' : '') + JSON.stringify(entry) + '\n'));
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  /** History entries, oldest first; lines that do not parse are skipped, not fatal. */
  readHistory(): HistoryEntry[] {
    let text: string;
    try {
      text = readFileSync(this.historyFile, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw new SnapbackError('state-corrupt', `cannot read ${this.historyFile}: ${(err as Error).message}`);
    }
    const out: HistoryEntry[] = [];
    for (const line of text.split('\n')) {
      if (!line.trim()) continue;
      try {
        const parsed = historyEntrySchema.safeParse(JSON.parse(line));
        if (parsed.success) out.push(parsed.data);
      } catch {}
    }
    return out;
  }

  /**
   * Makes this process the one that acts on the state directory (the daemon, or a fallback revert
   * while the daemon is down): an exclusive flock on `lock`, held by a descriptor kept open for the
   * life of the process, so the kernel lets go when the holder dies, whatever its pid becomes.
   * Returns the release function.
   */
  lock(bootId: string): () => void {
    const path = join(this.root, 'lock');
    let fd: number;
    try {
      // Node opens with O_CLOEXEC: no child (a switch, a timer) keeps the lock after the agent dies.
      fd = openSync(path, constants.O_RDWR | constants.O_CREAT, 0o600);
    } catch (err) {
      throw new SnapbackError('state-unwritable', `cannot open ${path}: ${(err as Error).message}`);
    }
    // Node has no flock(2). flock(1) locks the open file description it shares with us as fd 3 and
    // exits; the lock stays with our descriptor.
    const r = spawnSync('flock', ['--nonblock', '--exclusive', '--conflict-exit-code', '75', '3'], { stdio: ['ignore', 'ignore', 'pipe', fd] });
    if (r.status !== 0) {
      closeSync(fd);
      if (r.status === 75) {
        const pid = lockHolder(path);
        throw new SnapbackError('busy', `another snapback-agent${pid ? ` (pid ${pid})` : ''} is acting on ${this.root}`, pid ? { pid } : {});
      }
      const why = r.error?.message ?? (String(r.stderr).trim() || `flock exited ${r.status ?? r.signal}`);
      throw new SnapbackError('state-unwritable', `cannot lock ${path}: ${why}`);
    }
    // For people and the busy message only; the flock alone decides.
    try {
      ftruncateSync(fd, 0);
      writeSync(fd, `${process.pid} ${bootId}\n`, 0);
    } catch {}
    let held = true;
    return () => {
      // Twice would close whatever descriptor has reused the number since.
      if (!held) return;
      held = false;
      try {
        ftruncateSync(fd, 0);
      } catch {}
      closeSync(fd);
    };
  }

  removeRun(key: string): void {
    rmSync(this.runDir(key), { recursive: true, force: true });
  }

  /** Keeps the output of the newest `keep` switch runs (by last change); older ones go. */
  pruneRuns(keep = 200): void {
    let entries: { name: string; mtime: number }[];
    try {
      entries = readdirSync(this.runsDir).map((name) => ({ name, mtime: statSync(join(this.runsDir, name)).mtimeMs }));
    } catch {
      return;
    }
    entries.sort((a, b) => b.mtime - a.mtime);
    for (const e of entries.slice(keep)) this.removeRun(e.name);
  }
}

/** The pid the holder wrote, if it has yet: information, not proof. */
function lockHolder(path: string): number | undefined {
  try {
    const pid = Number(readFileSync(path, 'utf8').split(' ')[0]);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function writeDurably(path: string, data: string, flag: 'w' | 'a'): void {
  const flags = { w: constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, a: constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND };
  const fd = openSync(path, flags[flag], 0o600);
  try {
    writeAll(fd, Buffer.from(data));
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function writeAll(fd: number, buf: Buffer): void {
  let off = 0;
  while (off < buf.length) off += writeSync(fd, buf, off);
}

function fsyncDir(dir: string): void {
  const fd = openSync(dir, constants.O_RDONLY | constants.O_DIRECTORY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
