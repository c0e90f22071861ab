// node services/models/ts/dist/main.js: serve one model per the RDV_MODEL_* env contract.
import { setupTracing, TracingConfigError, type Tracing } from "./src/tracing";

let tracing: Tracing;
try {
  tracing = setupTracing(process.env);
} catch (err) {
  if (!(err instanceof TracingConfigError)) throw err;
  process.stderr.write(`rendezvous model (node): bad configuration: ${err.message}\n`);
  process.exit(2);
}
// Loaded only now: the gRPC instrumentation patches @grpc/grpc-js as it is first required.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { main } = require("./src/main") as typeof import("./src/main");

main().then(
  async (code) => {
    await tracing.shutdown();
    process.exit(code);
  },
  (err: unknown) => {
    process.stderr.write(`rendezvous model (node): ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
