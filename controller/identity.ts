// Which SSH key the controller signs with: the fleet file's `identity.sshKey` (a key file, or the
// same key held by ssh-agent when the file is encrypted), else every ssh-ed25519 key in ssh-agent;
// without a fleet file, ssh-agent or ~/.ssh/id_ed25519.

import { existsSync, readFileSync } from 'node:fs';
import { SnapbackError } from '../shared/errors.ts';
import { expandHome, type Fleet } from '../shared/fleet.ts';
import { agentIdentities, agentSigner, keyFileSigner, readKeyFile, type Signer } from '../shared/ssh.ts';

export async function resolveSigners(fleet: Fleet, env: NodeJS.ProcessEnv = process.env): Promise<Signer[]> {
  const sock = env.SSH_AUTH_SOCK;
  const keyPath = fleet.identity?.sshKey ? expandHome(fleet.identity.sshKey) : undefined;
  if (keyPath) {
    refusePublicHalf(keyPath);
    const file = readKeyFile(keyPath);
    if (file.privateKey) return [keyFileSigner(keyPath, file)];
    if (sock) {
      const held = (await agentIdentities(sock)).find((k) => k.blob.equals(file.publicKey.blob));
      if (held) return [agentSigner(sock, held)];
    }
    throw new SnapbackError(
      'config-invalid',
      `identity.sshKey ${keyPath} is encrypted and ${sock ? 'the ssh-agent at SSH_AUTH_SOCK does not hold it' : 'no ssh-agent is running (SSH_AUTH_SOCK is unset)'}: run "ssh-add ${keyPath}"`,
    );
  }
  if (!sock) {
    throw new SnapbackError('config-invalid', 'no identity: set "identity": { "sshKey": "~/.ssh/id_ed25519" } in the fleet file, or start ssh-agent and ssh-add your key');
  }
  const keys = await agentIdentities(sock);
  if (!keys.length) throw new SnapbackError('config-invalid', `the ssh-agent at ${sock} holds no ssh-ed25519 key: ssh-add one`);
  return keys.map((k) => agentSigner(sock, k));
}

/** `identity.sshKey` naming `id_ed25519.pub`: the public half signs nothing; say which file to name. */
function refusePublicHalf(path: string): void {
  let text = '';
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    return; // readKeyFile says what is wrong with an unreadable file
  }
  if (!/^\s*(ssh-|ecdsa-|sk-)\S+ [A-Za-z0-9+/=]+/.test(text)) return;
  const priv = path.endsWith('.pub') ? path.slice(0, -'.pub'.length) : undefined;
  throw new SnapbackError(
    'config-invalid',
    `identity.sshKey ${path} is the public half of a key pair: point it at the private key${priv ? ` (${priv}${existsSync(priv) ? '' : ', if you have it'})` : ''}; the host lists the public key in authorizedKeys`,
  );
}

/**
 * The identity of a fleet made without a fleet file: ssh-agent's ssh-ed25519 keys when it holds
 * any (`undefined`: resolveSigners tries them all), else ~/.ssh/id_ed25519 — what ssh offers first.
 */
export async function defaultIdentity(env: NodeJS.ProcessEnv = process.env): Promise<Fleet['identity']> {
  const sock = env.SSH_AUTH_SOCK;
  let agent = 'no ssh-agent is running (SSH_AUTH_SOCK is unset)';
  if (sock) {
    try {
      if ((await agentIdentities(sock)).length) return undefined;
      agent = `the ssh-agent at ${sock} holds no ssh-ed25519 key`;
    } catch (err) {
      agent = `the ssh-agent at ${sock} did not answer (${(err as Error).message})`;
    }
  }
  const key = expandHome('~/.ssh/id_ed25519');
  if (existsSync(key)) return { sshKey: key };
  throw new SnapbackError('config-invalid', `no identity: ${agent}, and there is no ${key}: ssh-add your key, or make one with "ssh-keygen -t ed25519"`);
}
