// A TCP proxy on loopback between controller and agent, to break *new* connections while the
// established ones keep working — the conntrack trap of TESTBED.md, without a firewall.

import { createConnection, createServer, type Server, type Socket } from 'node:net';

export type ProxyMode = 'pass' | 'refuse' | 'blackhole';

export class Proxy {
  mode: ProxyMode = 'pass';
  private readonly server: Server;
  private readonly sockets = new Set<Socket>();
  port = 0;

  constructor(targetPort: number) {
    this.server = createServer((client) => {
      this.sockets.add(client);
      client.on('close', () => this.sockets.delete(client));
      client.on('error', () => client.destroy());
      if (this.mode === 'refuse') return client.destroy();
      if (this.mode === 'blackhole') return; // accepted, never answered: like a dropped SYN, it times out
      const upstream = createConnection({ host: '127.0.0.1', port: targetPort });
      this.sockets.add(upstream);
      upstream.on('close', () => this.sockets.delete(upstream));
      upstream.on('error', () => client.destroy());
      client.on('close', () => upstream.destroy());
      upstream.on('close', () => client.destroy());
      client.pipe(upstream).pipe(client);
    });
  }

  async listen(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    this.port = (this.server.address() as { port: number }).port;
    return this;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
