// ~/.ssh/known_hosts as ssh reads it: which host keys a host may present, and which keys are
// @revoked for it. Host patterns: plain, `[host]:port`, hashed `|1|salt|hash`, `*`/`?` and `!negation`.

import { createHmac } from 'node:crypto';
import { matchWildcard, publicKeyFromBlob, type PublicKey } from './ssh.ts';

export interface KnownHosts {
  /** host keys listed for the host */
  keys: PublicKey[];
  /** keys marked `@revoked` for the host: never accepted, whichever source lists them as valid */
  revoked: PublicKey[];
}

/** The ssh-ed25519 entries of known_hosts `text` that apply to `host` (or `[host]:port`). */
export function knownHosts(text: string, host: string, port?: number): KnownHosts {
  const names = [host, ...(port ? [`[${host}]:${port}`] : [])];
  const out: KnownHosts = { keys: [], revoked: [] };
  for (const line of text.split('\n')) {
    const fields = line.trim().split(/\s+/);
    if (!fields[0] || fields[0].startsWith('#')) continue;
    const marker = fields[0].startsWith('@') ? fields.shift() : undefined;
    // `@cert-authority` names a CA that signs host certificates, not a host key, and Snapback does
    // not take certificates: such a line vouches for nothing. An unknown marker is skipped, as ssh does.
    if (marker !== undefined && marker !== '@revoked') continue;
    const [patterns, type, data] = fields;
    if (!patterns || type !== 'ssh-ed25519' || !data) continue;
    // Both names are looked up (the agent's port is not ssh's); a line that excludes either applies to neither.
    const verdicts = names.map((n) => hostMatches(patterns, n));
    if (verdicts.includes('excluded') || !verdicts.includes('yes')) continue;
    try {
      (marker ? out.revoked : out.keys).push(publicKeyFromBlob(Buffer.from(data, 'base64')));
    } catch {}
  }
  return out;
}

/** ssh's rule: a hashed field is one name; otherwise some pattern matches and no `!pattern` does. */
function hostMatches(patterns: string, name: string): 'yes' | 'no' | 'excluded' {
  if (patterns.startsWith('|1|')) {
    const [, , salt = '', hash] = patterns.split('|');
    return createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest('base64') === hash ? 'yes' : 'no';
  }
  let hit = false;
  for (const p of patterns.split(',')) {
    if (p.startsWith('!')) {
      if (matchWildcard(name, p.slice(1))) return 'excluded';
    } else if (matchWildcard(name, p)) {
      hit = true;
    }
  }
  return hit ? 'yes' : 'no';
}
