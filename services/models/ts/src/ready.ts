// The ready file a supervisor waits for: the fields services/core/server.py's
// write_ready_file writes (pid, endpoint, then the container's facts), written to a
// temporary file and renamed, so a reader never sees half of it.
import { mkdirSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";

export function writeReadyFile(path: string, facts: { endpoint: string } & Record<string, unknown>): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.tmp`;
  writeFileSync(tmp, JSON.stringify({ pid: process.pid, ...facts }));
  renameSync(tmp, path);
}
