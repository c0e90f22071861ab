// The diabetes model, served from the same committed JSON artifact the Python container
// loads (services/models/artifacts/diabetes-<algorithm>.json, written by
// tools/train_diabetes.py): score = intercept + Σ coefficient·feature, summed in the
// artifact's feature order exactly as services/models/diabetes.py does, so both containers
// give bit-identical scores for the same input.
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import {
  FeatureType,
  type GetModelMetadataResponse,
  type PredictRequest,
  type PredictResponse,
} from "../gen/rendezvous/v1/model";
import { ConfigError, type Algorithm, type DiabetesArgs } from "./config";
import { invalidFeatures, type Violation } from "./errors";
import type { Model } from "./model";

export const NOT_A_NUMBER = "must be a finite number";
export const REQUIRED = "is required";
export const PLATFORM = "node";
export const OUTPUTS = ["model"];

/** dist/src → services/models/artifacts (this file runs compiled from services/models/ts/dist/src). */
export const ARTIFACT_DIR = resolve(__dirname, "..", "..", "..", "artifacts");

export function artifactPath(algorithm: Algorithm): string {
  return resolve(ARTIFACT_DIR, `diabetes-${algorithm}.json`);
}

export interface ArtifactFeature {
  name: string;
  description: string;
}

/** The parts of the artifact serving needs (the Python model validates the rest). */
export interface Artifact {
  algorithm: Algorithm;
  sklearnVersion: string;
  features: ArtifactFeature[];
  coefficients: number[];
  intercept: number;
}

export function featurePath(name: string): string {
  return `features.${name}`;
}

export function loadArtifact(path: string): Artifact {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(path, "utf-8"));
  } catch (err) {
    throw new ConfigError(`cannot read the diabetes artifact ${path}: ${(err as Error).message}`);
  }
  const fail = (what: string): never => {
    throw new ConfigError(`${path} is not a diabetes artifact: ${what}`);
  };
  const a = (typeof raw === "object" && raw !== null ? raw : fail("not a JSON object")) as Record<string, unknown>;
  if (a["format"] !== 1) fail(`format ${JSON.stringify(a["format"])}, expected 1`);
  if (a["algorithm"] !== "ridge" && a["algorithm"] !== "linear") fail("algorithm is not ridge or linear");
  const features = Array.isArray(a["features"]) ? (a["features"] as unknown[]) : fail("no features list");
  if (features.length === 0) fail("no features");
  const parsedFeatures = features.map((f, i): ArtifactFeature => {
    const feature = (typeof f === "object" && f !== null ? f : {}) as Record<string, unknown>;
    const name = feature["name"];
    const description = feature["description"] ?? "";
    if (typeof name !== "string" || name === "" || typeof description !== "string") {
      return fail(`features[${i}] needs a name and a string description`);
    }
    return { name, description };
  });
  const coefficients = Array.isArray(a["coefficients"]) ? (a["coefficients"] as unknown[]) : fail("no coefficients");
  if (coefficients.length !== parsedFeatures.length) fail("coefficients and features differ in length");
  if (!coefficients.every(isFiniteNumber)) fail("a coefficient is not a finite number");
  if (!isFiniteNumber(a["intercept"])) fail("intercept is not a finite number");
  if (typeof a["sklearn_version"] !== "string") fail("no sklearn_version");
  return {
    algorithm: a["algorithm"] as Algorithm,
    sklearnVersion: a["sklearn_version"] as string,
    features: parsedFeatures,
    coefficients: coefficients as number[],
    intercept: a["intercept"] as number,
  };
}

function isFiniteNumber(value: unknown): value is number {
  return typeof value === "number" && Number.isFinite(value);
}

interface Term {
  name: string;
  path: string;
  coefficient: number;
}

export class DiabetesModel implements Model {
  readonly artifact: Artifact;
  private readonly terms: Term[];
  private readonly metadataResponse: GetModelMetadataResponse;

  constructor(
    name: string,
    private readonly version: string,
    args: DiabetesArgs,
  ) {
    const path = args.artifact ?? artifactPath(args.algorithm);
    this.artifact = loadArtifact(path);
    if (this.artifact.algorithm !== args.algorithm) {
      throw new ConfigError(`${path} holds a ${this.artifact.algorithm} model, not ${args.algorithm}`);
    }
    this.terms = this.artifact.features.map((feature, i) => ({
      name: feature.name,
      path: featurePath(feature.name),
      coefficient: this.artifact.coefficients[i] as number,
    }));
    this.metadataResponse = {
      name,
      version,
      platform: PLATFORM,
      inputs: this.artifact.features.map((feature) => ({
        name: feature.name,
        type: FeatureType.FEATURE_TYPE_NUMBER,
        required: true,
        description: feature.description,
      })),
      outputs: [...OUTPUTS],
    };
  }

  metadata(): GetModelMetadataResponse {
    return this.metadataResponse;
  }

  /** Instant, so the budget is not consulted (as in the Python model): a late answer is still recorded. */
  predict(request: PredictRequest): PredictResponse {
    const features = request.features;
    let score = this.artifact.intercept;
    const violations: Violation[] = [];
    for (const { name, path, coefficient } of this.terms) {
      if (!Object.hasOwn(features, name)) {
        violations.push([path, REQUIRED]);
        continue;
      }
      const value: unknown = features[name];
      if (!isFiniteNumber(value)) {
        violations.push([path, NOT_A_NUMBER]);
        continue;
      }
      score += coefficient * value;
    }
    if (violations.length > 0) {
      throw invalidFeatures(violations);
    }
    return { score, outputs: { model: this.artifact.algorithm }, modelVersion: this.version };
  }
}
