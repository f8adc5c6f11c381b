// The console as an operator meets it: `snapback-agent try` in a real terminal (tmux), the refusals
// that say what to do (no terminal, not root), help without a configuration file, an empty history.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { haveNix } from './helpers/nix.ts';
import { AGENT_BIN, ScratchHost, waitFor } from './helpers/host.ts';

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const hosts: ScratchHost[] = [];
after(async () => {
  for (const h of hosts) await h.cleanup();
});

async function host(): Promise<ScratchHost> {
  const h = new ScratchHost('console').install();
  hosts.push(h);
  await h.start();
  return h;
}

function haveTmux(): string | undefined {
  const r = spawnSync('tmux', ['-V'], { encoding: 'utf8' });
  return r.status === 0 ? undefined : 'tmux is not installed (apt-get install tmux): skipping the tests of snapback-agent try in a terminal';
}
const noTmux = haveTmux();
if (noTmux) console.warn(`SKIPPED: ${noTmux}`);

/** A detached tmux session on its own server, running `argv` in a 120x30 terminal. */
class Terminal {
  private readonly server: string;
  constructor(h: ScratchHost, argv: string[]) {
    this.server = `snapback-${process.pid}-${Math.random().toString(36).slice(2)}`;
    // The shell stays after the command to show its exit status, and for capture-pane to read.
    const script = join(h.dir, `${this.server}.sh`);
    writeFileSync(script, `${argv.map((a) => `'${a.replace(/'/g, `'\\''`)}'`).join(' ')}\necho "exit status $?"\nexec sleep 600\n`);
    this.tmux(['new-session', '-d', '-x', '120', '-y', '30', '-s', 'try', 'sh', script]);
  }
  private tmux(args: string[]): string {
    const r = spawnSync('tmux', ['-L', this.server, ...args], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`tmux ${args[0]}: ${r.stderr}`);
    return r.stdout;
  }
  screen(): string {
    return this.tmux(['capture-pane', '-p', '-t', 'try']);
  }
  keys(...keys: string[]): void {
    this.tmux(['send-keys', '-t', 'try', ...keys]);
  }
  async until(re: RegExp, timeoutMs = 30_000): Promise<RegExpMatchArray> {
    try {
      await waitFor(() => re.test(this.screen()), timeoutMs);
    } catch {
      throw new Error(`the terminal never showed ${re}; it shows:\n${this.screen()}`);
    }
    return this.screen().match(re)!;
  }
  close(): void {
    spawnSync('tmux', ['-L', this.server, 'kill-server'], { stdio: 'ignore' });
  }
}

async function tryIn(h: ScratchHost, timeout: number): Promise<{ term: Terminal; x: string }> {
  const x = h.toplevel('x');
  const term = new Terminal(h, [process.execPath, AGENT_BIN, 'try', x, '--timeout', String(timeout), '--config', h.configPath]);
  after(() => term.close());
  await term.until(/reverting in \d+s; keep this configuration\? \[y\/N\]/);
  assert.equal(h.running(), x, 'the trial runs while the question is asked');
  assert.deepEqual(h.generations(), [1]);
  return { term, x };
}

describe('snapback-agent try in a terminal', { skip: skip ?? noTmux }, () => {
  it('"y" confirms: a new generation, exit 0', async () => {
    const h = await host();
    const { term, x } = await tryIn(h, 60);
    term.keys('y');
    await term.until(/exit status 0/);
    assert.match(term.screen(), /confirmed/);
    assert.deepEqual(h.generations(), [1, 2]);
    assert.equal(h.bootDefault(), x);
    assert.equal(h.history().at(-1).outcome.outcome, 'confirmed');
  });

  it('"n" reverts now: the previous system runs, the profile is untouched, exit 1', async () => {
    const h = await host();
    const { term } = await tryIn(h, 60);
    term.keys('n');
    await term.until(/exit status 1/);
    assert.match(term.screen(), /reverted: requested/);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
  });

  it('Ctrl-C reverts', async () => {
    const h = await host();
    const { term } = await tryIn(h, 60);
    term.keys('C-c');
    await term.until(/exit status 1/);
    assert.match(term.screen(), /reverted: requested/);
    assert.equal(h.running(), h.gen1);
  });

  it('no answer: the deadline reverts, and the terminal says so', async () => {
    const h = await host();
    const { term } = await tryIn(h, 3);
    await term.until(/exit status 1/);
    assert.match(term.screen(), /the deadline passed: reverted/);
    assert.match(term.screen(), /reverted: timeout/);
    assert.equal(h.running(), h.gen1);
    assert.deepEqual(h.generations(), [1]);
  });
});

describe('console refusals that say what to do', { skip }, () => {
  it('try without a terminal refuses (exit 2) and points to activate; nothing changes', async () => {
    const h = await host();
    const r = await h.cli(['try', h.toplevel('x')], { json: false });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /try asks on a terminal, and standard input is not one; in a script use "snapback-agent activate TARGET/);
    assert.deepEqual(h.history(), []);
    assert.deepEqual(h.switchCalls(), []);
  });

  it('not root: "must run as root (try sudo)", not "is the agent running?"', async (t) => {
    const h = await host();
    // Let nobody read the configuration, as /etc/snapback/agent.json is; the socket stays root's 0600.
    chmodSync(h.dir, 0o755);
    chmodSync(h.configPath, 0o644);
    const probe = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--version'], { encoding: 'utf8' });
    if (probe.status !== 0) return t.skip(`SKIPPED: cannot run a process as an unprivileged user (setpriv): ${probe.stderr || probe.error?.message}`);
    for (const cmd of [['status'], ['confirm'], ['history']]) {
      const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, AGENT_BIN, ...cmd, '--config', h.configPath], { encoding: 'utf8' });
      assert.equal(r.status, 3, `${cmd}: ${r.stdout}${r.stderr}`);
      assert.match(r.stderr, /the console must run as root \(try sudo\)/);
      assert.doesNotMatch(r.stderr, /is snapback-agent serve running/);
    }
    // A configuration only root can read says the same.
    chmodSync(h.configPath, 0o600);
    const r = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, AGENT_BIN, 'status', '--config', h.configPath], { encoding: 'utf8' });
    assert.equal(r.status, 2);
    assert.match(r.stderr, /EACCES.*must run as root: try sudo/);
  });

  it('an empty history is one JSON result with no entries, not nothing', async () => {
    const h = await host();
    const r = await h.cli(['history']);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.out, { type: 'result', exit: 0, ok: true, entries: [] });
    assert.deepEqual(r.events, []);
    const text = await h.cli(['history'], { json: false });
    assert.equal(text.stdout, 'no history yet\n');
  });
});
