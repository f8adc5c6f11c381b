// The thread of a StoreWriterThread (agent/store-writer.ts): runs its requests in order.

import { parentPort } from 'node:worker_threads';
import type { ManifestEntry } from '../shared/protocol.ts';
import { StoreWriter } from './store-writer.ts';

type Request = { id: number } & ({ op: 'open' } | { op: 'add'; entry: ManifestEntry; hexHash: string; file: string } | { op: 'close' });

const writer = new StoreWriter();
let queue: Promise<void> = Promise.resolve();
parentPort!.on('message', (m: Request | { op: 'kill' }) => {
  if (m.op === 'kill') return writer.kill();
  queue = queue.then(async () => {
    try {
      if (m.op === 'open') await writer.open();
      else if (m.op === 'add') await writer.add(m.entry, m.hexHash, m.file);
      else await writer.close();
      parentPort!.postMessage({ id: m.id, ok: true });
    } catch (err) {
      parentPort!.postMessage({ id: m.id, ok: false, message: (err as Error).message });
    }
  });
});
