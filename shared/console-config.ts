// What a console command needs of the agent's configuration: where its control socket is. Read
// without the schemas (shared/config.ts), so that every console command starts without loading them.

import { readInput } from './input.ts';

export const DEFAULT_CONFIG_PATH = '/etc/snapback/agent.json';
export const DEFAULT_CONTROL_SOCKET = '/run/snapback/control.sock';

/**
 * The control socket the configuration at `path` names, without validating the rest (the agent did
 * when it started; `snapback-agent check-config` does at will). Undefined when the file is not JSON
 * or names no usable socket: the full validation then says why. Throws `config-invalid` when the
 * file cannot be read.
 */
export function controlSocketOf(path: string): string | undefined {
  const text = readInput(path, 'the configuration');
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) return undefined;
  const socket = (raw as { controlSocket?: unknown }).controlSocket ?? DEFAULT_CONTROL_SOCKET;
  return typeof socket === 'string' && socket.startsWith('/') ? socket : undefined;
}
