// `snapback-agent serve`: the daemon. Loaded by agent/cli.ts only for this command, so that the
// console commands (every one of which pays its own start-up) load none of it.

import { realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import type { AgentConfig } from '../shared/config.ts';
import { EXIT, SnapbackError } from '../shared/errors.ts';
import { VERSION } from '../shared/version.ts';
import { describeStatus } from '../shared/text.ts';
import { keyFileSigner } from '../shared/ssh.ts';
import { Agent, type AgentOptions } from './agent.ts';
import { ControlServer } from './control.ts';
import { createLogger, type Logger } from './log.ts';
import { WireServer } from './server.ts';
import { createNotifier, ownUnit, unitText, type Notifier } from './systemd.ts';
import { Metrics } from './metrics.ts';
import { OutcomeHooks } from './hooks.ts';

export async function serve(config: AgentConfig, configPath: string): Promise<number> {
  const log = createLogger(config.log.level);
  // Every known source of errors has its handler; a promise nobody awaited that still fails is
  // logged, not allowed to end a process that holds a deadline.
  process.on('unhandledRejection', (err) => log.error({ err: (err as Error)?.stack ?? String(err) }, 'unhandled rejection'));
  const notifier = createNotifier(log);
  // The fallback timer runs this very agent (the known-good one) again: absolute paths only.
  const reinvoke = [process.execPath, realpathSync(process.argv[1]!), '--config', resolve(configPath)];
  let agent: Agent;
  try {
    agent = await openWhenFree(config, log, notifier, { reinvoke });
  } catch (err) {
    log.fatal({ code: (err as SnapbackError).code }, (err as Error).message);
    notifier.status(`not started: ${(err as Error).message}`);
    return err instanceof SnapbackError ? err.exitCode : EXIT.usage;
  }
  // Both watch the history from before the start: an outcome recorded while starting counts too.
  const metrics = new Metrics(agent, config.metrics, log);
  const hooks = OutcomeHooks.attach(agent, config.hooks.onOutcome, log);
  const control = await ControlServer.listen(config.controlSocket, agent, log);
  await agent.start();
  const wire = await listenWire(config, agent, log);
  if (wire) metrics.connections = () => wire.connections();
  await metrics.start();
  log.info({ version: VERSION, stateDir: config.stateDir, controlSocket: config.controlSocket, phase: agent.phase, runner: agent.runnerName, notify: notifier.via }, 'snapback-agent serving');
  notifier.ready();
  const showStatus = () => {
    try {
      notifier.status(describeStatus(agent.status()).split('\n')[0]!);
    } catch (err) {
      log.debug({ err: (err as Error).message }, 'cannot tell systemd the status');
    }
  };
  showStatus();
  // systemd's status line: at every change, each second while a deadline counts down, and every
  // few seconds when idle (the running system can change beside us). Outside systemd, nothing.
  agent.subscribe(() => showStatus());
  let tick = 0;
  const statusTimer = notifier.via === 'none' ? undefined : setInterval(() => (agent.phase !== 'idle' || ++tick % 5 === 0) && showStatus(), 1000);

  // After a commit that changed this agent's own unit (or the package its ExecStart names),
  // exit cleanly: systemd (Restart=always) starts the new agent.
  const unit = ownUnit();
  const unitBefore = unit ? await unitText(unit) : undefined;

  if (process.env.SNAPBACK_DEBUG_FREEZE === '1') {
    // Test-only: a frozen event loop, to prove the systemd watchdog restarts the agent.
    process.on('SIGUSR2', () => {
      log.warn('SNAPBACK_DEBUG_FREEZE: freezing the event loop');
      for (;;);
    });
  }

  return new Promise<number>((resolve) => {
    let stopping = false;
    const stop = (why: string) => {
      if (stopping) return;
      stopping = true;
      log.info({ why }, 'stopping; a running trial keeps its deadline and resumes on the next start');
      notifier.stopping();
      clearInterval(statusTimer);
      void Promise.all([control.close(), wire?.close(), metrics.close()])
        .then(() => agent.close())
        // A hook of the last outcome (the confirm that restarts this agent) still gets to finish.
        .then(() => hooks.settled())
        .then(() => {
          notifier.close();
          resolve(EXIT.ok);
        });
    };
    agent.subscribe((p) => {
      if (p.type !== 'outcome' || p.outcome.outcome !== 'confirmed' || !unit) return;
      void unitText(unit).then((now) => {
        if (now !== undefined && now !== unitBefore) stop(`the commit changed ${unit}; restarting into the new agent`);
      });
    });
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
}

/**
 * Agent.open, waiting while another live process holds the state directory (a fallback revert that
 * ran while the daemon was down): exiting instead would only have systemd restart us into the same
 * refusal. Retries until the kernel releases the lock, however long the holder takes.
 */
async function openWhenFree(config: AgentConfig, log: Logger, notifier: Notifier, options: AgentOptions): Promise<Agent> {
  let waited = false;
  for (;;) {
    try {
      const agent = Agent.open(config, log, options);
      if (waited) log.info(`${config.stateDir} is free; starting`);
      return agent;
    } catch (err) {
      if (!(err instanceof SnapbackError) || err.code !== 'busy') throw err;
      const pid = err.details?.pid;
      if (!waited) log.warn({ pid }, `${err.message}; waiting until it lets go`);
      waited = true;
      notifier.waiting(`waiting for the state directory, held by ${pid ? `pid ${pid}` : 'another process'}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
}

/**
 * The network side. Without authorized keys nobody could deploy, so the port stays closed; without
 * a readable host key the agent cannot prove itself. Either way the console keeps working.
 */
async function listenWire(config: AgentConfig, agent: Agent, log: ReturnType<typeof createLogger>): Promise<WireServer | undefined> {
  if (config.authorizedKeys.length === 0) {
    log.info('no authorizedKeys configured: not listening for controllers (the console works)');
    return undefined;
  }
  let host;
  try {
    host = keyFileSigner(config.hostKey);
  } catch (err) {
    log.error({ hostKey: config.hostKey }, `cannot use the host key, not listening for controllers: ${(err as Error).message}`);
    return undefined;
  }
  const authorized = WireServer.authorizedKeys(config.authorizedKeys, log);
  if (authorized.length === 0) {
    log.warn('no usable authorizedKeys line (see the warnings above): not listening for controllers (the console works)');
    return undefined;
  }
  const wire = await WireServer.listen(config, agent, log, host, authorized);
  const { address, port } = wire.address();
  log.info({ address, port, tls: Boolean(config.listen.tls), hostKey: host.publicKey.fingerprint }, `listening for controllers on port ${port}`);
  return wire;
}
