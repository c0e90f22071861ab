// Errors a client may see, as the Python services send them (services/core/errors.py):
// a status code, a safe message and google.rpc details in the grpc-status-details-bin
// trailer (BadRequest field violations first, then ErrorInfo with the reason). Anything
// unexpected is INTERNAL with a generic message; its text only goes to the log.
import { Metadata, status, type ServiceError as GrpcError } from "@grpc/grpc-js";
import { Any } from "../gen/google/protobuf/any";
import { BadRequest, ErrorInfo } from "../gen/google/rpc/error_details";
import { Status } from "../gen/google/rpc/status";
import type { ModelError } from "../gen/rendezvous/v1/common";

export const ERROR_DOMAIN = "rendezvous.v1";
export const STATUS_DETAILS_KEY = "grpc-status-details-bin";
const INTERNAL_MESSAGE = "internal error";

export class ServiceError extends Error {
  constructor(
    readonly code: status,
    message: string,
    readonly reason: string = status[code],
  ) {
    super(message);
  }

  details(): Any[] {
    return [pack("google.rpc.ErrorInfo", ErrorInfo.encode(ErrorInfo.fromPartial({ reason: this.reason, domain: ERROR_DOMAIN })).finish())];
  }
}

/** One offending field: its path (e.g. features.bmi) and what is wrong with it. */
export type Violation = [field: string, description: string];

export class InvalidArgument extends ServiceError {
  readonly violations: Violation[];

  constructor(violations: Violation[], message?: string) {
    super(status.INVALID_ARGUMENT, message ?? `invalid request: ${violations.map(([field]) => field).join(", ")}`);
    this.violations = violations;
  }

  override details(): Any[] {
    const fieldViolations = this.violations.map(([field, description]) => ({ field, description }));
    const badRequest = BadRequest.encode(BadRequest.fromPartial({ fieldViolations })).finish();
    return [pack("google.rpc.BadRequest", badRequest), ...super.details()];
  }
}

/** An INVALID_ARGUMENT naming each offending feature, sorted by field then description
 * (as the Python models send them, whatever order the features came in). */
export function invalidFeatures(violations: Violation[]): InvalidArgument {
  const compare = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);
  return new InvalidArgument([...violations].sort(([fa, da], [fb, db]) => compare(fa, fb) || compare(da, db)));
}

export class DeadlineExceeded extends ServiceError {
  constructor(message = "the deadline passed before the model answered") {
    super(status.DEADLINE_EXCEEDED, message);
  }
}

function pack(typeName: string, value: Uint8Array): Any {
  return { typeUrl: `type.googleapis.com/${typeName}`, value: Buffer.from(value) };
}

/** The error a handler passes to grpc-js: code, message and the google.rpc.Status trailer. */
export function grpcError(err: ServiceError): Partial<GrpcError> {
  const metadata = new Metadata();
  const encoded = Status.encode({ code: err.code, message: err.message, details: err.details() }).finish();
  metadata.set(STATUS_DETAILS_KEY, Buffer.from(encoded));
  return { code: err.code, details: err.message, metadata };
}

/** A PredictBatch item's error, as its ModelError result. */
export function modelError(err: ServiceError): ModelError {
  return { grpcCode: err.code, reason: err.reason, message: err.message };
}

/** `err` as the client may see it: a ServiceError as is, anything else INTERNAL. */
export function clientError(err: unknown): ServiceError {
  return err instanceof ServiceError ? err : new ServiceError(status.INTERNAL, INTERNAL_MESSAGE);
}

/** The google.rpc.Status a failed call carried in its trailer (for clients and tests). */
export function statusDetails(metadata: Metadata | undefined): Status | undefined {
  const [raw] = metadata?.get(STATUS_DETAILS_KEY) ?? [];
  return raw instanceof Buffer ? Status.decode(raw) : undefined;
}
