// node services/models/ts/dist/main.js: serve one model per the RDV_MODEL_* env contract.
import { main } from "./src/main";

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`rendezvous model (node): ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exit(1);
  },
);
