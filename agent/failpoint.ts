// Crash points for the fault-injection tests: `SNAPBACK_FAILPOINTS=spawned:activate,…` makes the
// agent kill itself with SIGKILL at that instant, so a test can stand in exactly one window.

const armed = new Set((process.env.SNAPBACK_FAILPOINTS ?? '').split(',').filter(Boolean));

/** Dies here, like `kill -9` would, when the test armed this point; otherwise nothing. */
export function failpoint(name: string): void {
  if (armed.size && armed.has(name)) process.kill(process.pid, 'SIGKILL');
}
