// The one `--json` shape (shared/output.ts), command by command, from the real programs: every line
// is JSON, events come first, exactly one result comes last, and its `exit` is the process's status —
// for answers, refusals, usage errors, unreachable agents and empty results alike.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { z } from 'zod';
import type { DeployEvent } from '../controller/deploy.ts';
import {
  consoleEventSchema,
  consoleResults,
  controllerResults,
  deployEventLineSchema,
  deployEventSchema,
  errorResultSchema,
  helpResultSchema,
  lineSchema,
  versionResultSchema,
} from '../shared/output-schemas.ts';
import { haveNix } from './helpers/nix.ts';
import { AGENT_BIN, CONTROLLER_BIN, ScratchHost, jsonLines, cleanupsAfterAll } from './helpers/host.ts';

// The schema mirrors DeployEvent both ways: every event the controller can emit is a valid line,
// and the schema names no event the controller does not have.
type AsLine<E> = E extends { type: infer K } ? Omit<E, 'type'> & { event: K } : never;
type SchemaEvent = z.infer<typeof deployEventSchema>;
const everyEventFits: AsLine<DeployEvent> extends SchemaEvent ? true : false = true;
const noEventInvented: SchemaEvent['event'] extends DeployEvent['type'] ? true : false = true;
void everyEventFits;
void noEventInvented;

const skip = haveNix();
if (skip) console.warn(`SKIPPED: ${skip}`);

const cleanups = cleanupsAfterAll();

// No snapback.json here.
const empty = mkdtempSync(join(tmpdir(), 'snapback-output-'));
cleanups.push(() => rmSync(empty, { recursive: true, force: true }));

/**
 * Holds `stdout` to the shape: JSON Lines, events (each valid against `events`), then one result,
 * valid against `result`, whose `exit` is `code`. Returns the result.
 */
function shape(stdout: string, code: number, result: z.ZodType, events: z.ZodType = z.never()): any {
  const lines = jsonLines(stdout);
  assert.ok(lines.length >= 1, `no output at all (exit ${code})`);
  for (const l of lines) assert.equal(l.unparsed, undefined, `not JSON: ${l.unparsed}`);
  const last = lines.at(-1);
  for (const [i, l] of lines.slice(0, -1).entries()) {
    assert.equal(l.type, 'event', `line ${i + 1} of ${lines.length} is no event, and only the last line is the result:\n${stdout}`);
    const ok = events.safeParse(l);
    assert.ok(ok.success, `event ${JSON.stringify(l)}: ${ok.error?.message}`);
  }
  assert.equal(last.type, 'result', `the last line is the result:\n${stdout}`);
  assert.equal(last.exit, code, `the result's exit is the process's exit status:\n${stdout}`);
  const ok = result.safeParse(last);
  assert.ok(ok.success, `result ${JSON.stringify(last)}: ${ok.error?.message}`);
  for (const l of lines) assert.ok(lineSchema.safeParse(l).success, `a line of no known kind: ${JSON.stringify(l)}`);
  return last;
}

function run(bin: string, args: string[], env: NodeJS.ProcessEnv = {}): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [bin, ...args, '--json'], { cwd: empty, env: { ...process.env, SSH_AUTH_SOCK: '', ...env }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

describe('--json without a host: help, versions, usage and configuration errors', () => {
  const agentEnv = { SNAPBACK_CONFIG: join(empty, 'no-such-agent.json') };

  it('help and --version: the text inside one result (exit 0)', () => {
    for (const [bin, args] of [
      [CONTROLLER_BIN, ['help']],
      [CONTROLLER_BIN, ['help', 'deploy']],
      [CONTROLLER_BIN, ['status', '--help']],
      [AGENT_BIN, ['help', 'try']],
      [AGENT_BIN, ['--help']],
    ] as const) {
      const r = run(bin, [...args], agentEnv);
      assert.equal(r.code, 0, r.stderr);
      assert.match(shape(r.stdout, r.code, helpResultSchema).help, /usage: snapback/);
    }
    const v = run(CONTROLLER_BIN, ['--version']);
    shape(v.stdout, v.code, versionResultSchema);
  });

  it('usage errors: a bad-request result, exit 2, from both programs', () => {
    const cases: [string, string[], RegExp][] = [
      [CONTROLLER_BIN, [], /no command given/],
      [CONTROLLER_BIN, ['deploy', 'web1', '--tiemout', '30'], /unknown option --tiemout \(did you mean --timeout\?\)/],
      [CONTROLLER_BIN, ['deplyo'], /unknown command "deplyo" \(did you mean deploy\?\)/],
      [CONTROLLER_BIN, ['help', 'rolback'], /did you mean rollback/],
      [AGENT_BIN, ['hist'], /did you mean history/],
      [AGENT_BIN, ['activate', '--generaton', '3'], /did you mean --generation/],
      [AGENT_BIN, ['--timeout'], /--timeout/],
    ];
    for (const [bin, args, message] of cases) {
      const r = run(bin, args, agentEnv);
      assert.equal(r.code, 2, `${args.join(' ')}: ${r.stdout}${r.stderr}`);
      const res = shape(r.stdout, r.code, errorResultSchema);
      assert.equal(res.code, 'bad-request');
      assert.match(res.message, message);
    }
  });

  it('a missing fleet file or agent configuration: config-invalid, exit 2', () => {
    for (const args of [['status'], ['history', 'web1'], ['confirm', 'web1'], ['rollback', 'web1'], ['deploy', '--all']]) {
      const r = run(CONTROLLER_BIN, args);
      assert.equal(r.code, 2, r.stdout + r.stderr);
      assert.equal(shape(r.stdout, r.code, errorResultSchema).code, 'config-invalid');
    }
    for (const args of [['status'], ['check-config'], ['activate', '/nix/store/x']]) {
      const r = run(AGENT_BIN, args, agentEnv);
      assert.equal(r.code, 2, r.stdout + r.stderr);
      assert.equal(shape(r.stdout, r.code, errorResultSchema).code, 'config-invalid');
    }
  });

  it('try without a terminal: a bad-request result pointing to activate (exit 2), before any configuration', () => {
    const r = run(AGENT_BIN, ['try', '/nix/store/x'], agentEnv);
    assert.equal(r.code, 2);
    const res = shape(r.stdout, r.code, errorResultSchema);
    assert.equal(res.code, 'bad-request');
    assert.match(res.message, /snapback-agent activate TARGET/);
  });

  it('the agent not running: check-config, status and history still answer; requests say unreachable (exit 3)', async () => {
    const h = new ScratchHost('output');
    cleanups.push(() => h.cleanup());
    const cfg = await h.cli(['check-config']);
    assert.equal(cfg.code, 0, cfg.stdout + cfg.stderr);
    assert.equal(shape(cfg.stdout, cfg.code, consoleResults['check-config']).config.stateDir, h.stateDir);
    const st = await h.cli(['status']);
    assert.equal(st.code, 0, st.stdout + st.stderr);
    assert.equal(shape(st.stdout, st.code, consoleResults.status).offline, true);
    const hist = await h.cli(['history']);
    assert.equal(hist.code, 0, hist.stdout + hist.stderr);
    assert.deepEqual(shape(hist.stdout, hist.code, consoleResults.history).entries, []);
    for (const args of [['confirm'], ['rollback'], ['extend', '30'], ['activate', '/nix/store/x']]) {
      const r = await h.cli(args);
      assert.equal(r.code, 3, `${args}: ${r.stdout}${r.stderr}`);
      assert.equal(shape(r.stdout, r.code, errorResultSchema).code, 'unreachable');
    }
  });
});

describe('--json of every console command, on a running agent', { skip }, () => {
  it('activate (with events), status, extend, confirm, history, rollback, revert, activate --dry-run', async () => {
    const h = new ScratchHost('output').install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const { answer, status, history } = consoleResults;

    const a = await h.cli(['activate', h.toplevel('x', { beforeLink: 'echo starting demo.service' }), '--timeout', '60']);
    assert.equal(a.code, 0, a.stdout + a.stderr);
    shape(a.stdout, a.code, answer, consoleEventSchema);
    assert.ok(a.events.some((e) => e.event === 'phase' && e.phase === 'activating'), a.stdout);
    assert.ok(a.events.some((e) => e.event === 'line' && e.line === 'starting demo.service'), `the switch's output as line events:\n${a.stdout}`);

    const st = await h.cli(['status']);
    assert.equal(shape(st.stdout, st.code, status).phase, 'trial');
    const e = await h.cli(['extend', '120']);
    assert.equal(e.code, 0, e.stdout);
    assert.ok(shape(e.stdout, e.code, answer, consoleEventSchema).deadline);
    const tooLong = await h.cli(['extend', '100000']);
    assert.equal(tooLong.code, 2, tooLong.stdout);
    assert.equal(shape(tooLong.stdout, tooLong.code, errorResultSchema).code, 'timeout-out-of-range');
    const c = await h.cli(['confirm']);
    assert.equal(c.code, 0, c.stdout);
    assert.deepEqual(shape(c.stdout, c.code, answer, consoleEventSchema).outcome, { outcome: 'confirmed' });
    const again = await h.cli(['confirm']);
    assert.equal(again.code, 1);
    assert.equal(shape(again.stdout, again.code, errorResultSchema).code, 'no-trial');

    const b = await h.cli(['activate', h.toplevel('y'), '--timeout', '60']);
    const r = await h.cli(['rollback']);
    assert.equal(r.code, 0, r.stdout);
    assert.deepEqual(shape(r.stdout, r.code, answer, consoleEventSchema).outcome, { outcome: 'reverted', reason: 'requested' });
    const rv = await h.cli(['revert', '--id', b.out.id]);
    shape(rv.stdout, rv.code, z.union([answer, errorResultSchema]), consoleEventSchema);

    const hist = await h.cli(['history', '--limit', '3']);
    assert.equal(hist.code, 0);
    assert.equal(shape(hist.stdout, hist.code, history).entries.length, 3);

    const dry = await h.cli(['activate', h.toplevel('z'), '--dry-run']);
    assert.ok(shape(dry.stdout, dry.code, answer, consoleEventSchema).dryRun, dry.stdout);

    const bad = await h.cli(['activate', '--generation', '99']);
    assert.equal(bad.code, 1, bad.stdout);
    assert.equal(shape(bad.stdout, bad.code, answer, consoleEventSchema).outcome.code, 'bad-target');
  });
});

describe('--json of every controller command', { skip }, () => {
  it('deploy, status, confirm, rollback, history (empty too), and an unreachable host', async () => {
    const h = new ScratchHost('output').enableWire().install();
    cleanups.push(() => h.cleanup());
    await h.start();
    const fleet = await h.fleet({ target: { storePath: h.toplevel('x') }, confirmTimeoutSec: 30 });

    const empty = await h.snapback(['history', 'web1', '--fleet', fleet]);
    assert.equal(empty.code, 0, empty.stdout + empty.stderr);
    assert.deepEqual(shape(empty.stdout, empty.code, controllerResults.history).entries, []);

    const d = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(d.code, 0, d.stdout + d.stderr);
    assert.equal(shape(d.stdout, d.code, controllerResults.deploy, deployEventLineSchema).hosts[0].status, 'confirmed');

    const st = await h.snapback(['status', '--fleet', fleet]);
    assert.equal(st.code, 0);
    assert.equal(shape(st.stdout, st.code, controllerResults.status).hosts[0].status.phase, 'idle');
    const none = await h.snapback(['confirm', 'web1', '--fleet', fleet]);
    assert.equal(none.code, 1);
    assert.equal(shape(none.stdout, none.code, errorResultSchema).code, 'no-trial');

    await h.cli(['activate', h.toplevel('y'), '--timeout', '60']);
    const rb = await h.snapback(['rollback', 'web1', '--fleet', fleet]);
    assert.equal(rb.code, 0, rb.stdout);
    assert.deepEqual(shape(rb.stdout, rb.code, controllerResults.act).outcome, { outcome: 'reverted', reason: 'requested' });
    await h.cli(['activate', h.toplevel('z'), '--timeout', '60']);
    const c = await h.snapback(['confirm', 'web1', '--fleet', fleet]);
    assert.equal(c.code, 0, c.stdout);
    assert.deepEqual(shape(c.stdout, c.code, controllerResults.act).outcome, { outcome: 'confirmed' });

    const hist = await h.snapback(['history', 'web1', '--fleet', fleet, '--limit', '2']);
    assert.equal(shape(hist.stdout, hist.code, controllerResults.history).entries.length, 2);

    const unknownHost = await h.snapback(['history', 'db9', '--fleet', fleet]);
    assert.equal(unknownHost.code, 2);
    assert.equal(shape(unknownHost.stdout, unknownHost.code, errorResultSchema).code, 'bad-request');

    await h.stop();
    const down = await h.snapback(['status', '--fleet', fleet]);
    assert.equal(down.code, 3, down.stdout);
    assert.equal(shape(down.stdout, down.code, controllerResults.status).hosts[0].ok, false);
    const dDown = await h.snapback(['deploy', 'web1', '--fleet', fleet]);
    assert.equal(dDown.code, 3, dDown.stdout);
    assert.equal(shape(dDown.stdout, dDown.code, controllerResults.deploy, deployEventLineSchema).hosts[0].status, 'unreachable');
    for (const cmd of ['confirm', 'rollback', 'history']) {
      const r = await h.snapback([cmd, 'web1', '--fleet', fleet]);
      assert.equal(r.code, 3, `${cmd}: ${r.stdout}`);
      assert.equal(shape(r.stdout, r.code, errorResultSchema).code, 'unreachable');
    }
  });
});

describe('--timeout outside the host\'s range', { skip }, () => {
  async function rangedHost(): Promise<{ h: ScratchHost; x: string; fleet: string }> {
    const h = new ScratchHost('output').enableWire().install();
    cleanups.push(() => h.cleanup());
    h.writeConfig({ confirm: { defaultTimeoutSec: 30, minTimeoutSec: 10, maxTimeoutSec: 600, activationTimeoutSec: 30 } });
    await h.start();
    const x = h.toplevel('x');
    return { h, x, fleet: await h.fleet({ target: { storePath: x } }) };
  }

  it('the console: timeout-out-of-range, exit 2; nothing changes', async () => {
    const { h, x } = await rangedHost();
    for (const timeout of ['5', '601']) {
      const con = await h.cli(['activate', x, '--timeout', timeout]);
      assert.equal(con.code, 2, `console --timeout ${timeout}: ${con.stdout}`);
      assert.equal(shape(con.stdout, con.code, errorResultSchema).code, 'timeout-out-of-range');
    }
    assert.deepEqual(h.switchCalls(), []);
    assert.deepEqual(h.history(), []);
  });

  // The controller says timeout-out-of-range but exits 1: the host's result carries no code, and
  // exitCodeOf (controller/deploy.ts) counts every refused activate as "failed".
  it('the controller: the same code and exit 2; nothing changes', async () => {
    const { h, fleet } = await rangedHost();
    for (const timeout of ['5', '601']) {
      const ctl = await h.snapback(['deploy', 'web1', '--fleet', fleet, '--timeout', timeout]);
      const res = shape(ctl.stdout, ctl.code, controllerResults.deploy, deployEventLineSchema);
      assert.match(res.hosts[0].message, /timeout-out-of-range/);
      assert.equal(ctl.code, 2, `controller --timeout ${timeout}: ${ctl.stdout}`);
    }
    assert.deepEqual(h.switchCalls(), []);
    assert.deepEqual(h.history(), []);
  });
});
