// `snapback-agent try`: the `netplan try` habit on the host's console. Activates a trial through the
// control socket, then counts down on the terminal and asks; only "y" keeps the new system.

import type { Progress, Result, Status } from './agent.ts';
import { request, type ControlRequest } from './control.ts';
import { duration } from '../shared/text.ts';

type Activate = Extract<ControlRequest, { cmd: 'activate' }>;
type Answer = 'confirm' | 'rollback';

/** Keys that answer: "y" keeps; "n", Enter, Ctrl-C and Ctrl-D revert (the default is N). */
const KEYS: Record<string, Answer> = { y: 'confirm', Y: 'confirm', n: 'rollback', N: 'rollback', '\r': 'rollback', '\n': 'rollback', '\x03': 'rollback', '\x04': 'rollback' };

/**
 * Activates `req`, then asks on `out` until an answer or the deadline. Resolves with the command that
 * decided (`activate` when the trial never started) and the agent's result, which carries the outcome.
 */
export async function tryOnTerminal(
  socket: string,
  req: Activate,
  out: NodeJS.WriteStream,
  onProgress: (p: Progress) => void,
  user: { user?: string },
): Promise<{ cmd: 'activate' | Answer; result: Result }> {
  const started = await request(socket, req, onProgress);
  if (!started.ok || started.outcome || !started.deadline || !started.id) return { cmd: 'activate', result: started };
  const id = started.id;
  let deadline = Date.parse(started.deadline);
  const what = started.toplevel ?? id;

  const stdin = process.stdin;
  let answered: (a: Answer) => void = () => {};
  let answer = new Promise<Answer>((r) => (answered = r));
  const onKey = (chunk: string) => {
    for (const ch of chunk) if (KEYS[ch]) return answered(KEYS[ch]);
  };
  // Whatever ends this process before a "y" (a kill, the terminal closing) reverts: only a yes keeps.
  const onSignal = () => answered('rollback');
  const signals = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;
  stdin.setRawMode(true);
  stdin.setEncoding('utf8');
  stdin.on('data', onKey);
  stdin.resume();
  for (const s of signals) process.on(s, onSignal);
  const restore = () => {
    stdin.off('data', onKey);
    stdin.setRawMode(false);
    stdin.pause();
    for (const s of signals) process.off(s, onSignal);
  };

  const ask = () => {
    const left = Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
    out.write(`\r\x1b[Ktrial of ${what}: reverting in ${duration(left)}; keep this configuration? [y/N] `);
  };
  try {
    for (;;) {
      ask();
      const next = await Promise.race([answer, sleep(500)]);
      if (next === 'confirm' || next === 'rollback') {
        out.write(`${next === 'confirm' ? 'y' : 'n'}\n${next === 'confirm' ? 'confirming' : 'reverting'} deployment ${id}…\n`);
        const result = await request(socket, { cmd: next, id, ...user }, onProgress);
        // A refused confirm (the health gate) leaves the trial running: say why and ask again.
        if (next === 'confirm' && !result.ok && !result.outcome && result.code !== 'deployment-finished' && result.code !== 'no-trial' && result.code !== 'unknown-deployment') {
          out.write(`confirm refused (${result.code}): ${result.message}\n`);
          answer = new Promise<Answer>((r) => (answered = r));
          continue;
        }
        return { cmd: next, result };
      }
      // Someone else may have acted (the controller, another console), or moved the deadline.
      const s = await status(socket);
      if (s.deployment?.id === id && s.phase === 'trial' && s.deployment.deadline) deadline = Date.parse(s.deployment.deadline);
      const over = s.deployment?.id !== id || s.phase !== 'trial' || Date.now() >= deadline;
      if (over) {
        out.write('\n');
        const result = await outcome(socket, id);
        const o = result.outcome;
        const timedOut = o?.outcome === 'reverted' && o.reason === 'timeout';
        out.write(timedOut ? 'the deadline passed: reverted\n' : `deployment ${id} was ended elsewhere (another console or a controller)\n`);
        return { cmd: o?.outcome === 'confirmed' ? 'confirm' : 'rollback', result };
      }
    }
  } finally {
    restore();
  }
}

async function status(socket: string): Promise<Status> {
  return ((await request(socket, { cmd: 'status' })) as unknown as { status: Status }).status;
}

/** Waits until deployment `id` has ended and answers with its outcome. */
async function outcome(socket: string, id: string): Promise<Result> {
  for (;;) {
    const s = await status(socket);
    if (s.deployment?.id !== id && s.last?.id === id) return { ok: true, id, outcome: s.last.outcome };
    await sleep(250);
  }
}

function sleep(ms: number): Promise<'tick'> {
  return new Promise((r) => setTimeout(() => r('tick'), ms));
}
