package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	pb "github.com/rendezvous-ml/rendezvous/gen/go/rendezvous/v1"
)

// errorDomain is the ErrorInfo domain of every status a Rendezvous service decides on.
const errorDomain = "rendezvous.v1"

// rpcError is a failure meant for the caller: a code, a stable reason, a safe message and,
// for INVALID_ARGUMENT, the offending fields. It is the status of a failed Predict call and
// the ModelError of a failed PredictBatch item (services/core/errors.py's ServiceError).
type rpcError struct {
	code       codes.Code
	reason     string
	message    string
	violations []violation
}

func (e *rpcError) Error() string { return e.message }

// GRPCStatus is what grpc-go sends for the error: the code, the message and the details
// (a BadRequest with the violations, if any, then the ErrorInfo).
func (e *rpcError) GRPCStatus() *status.Status {
	st := status.New(e.code, e.message)
	if e.code == codes.Internal {
		return st // no details: nothing about an unexpected failure leaves the process
	}
	var details []*errdetails.BadRequest_FieldViolation
	for _, v := range e.violations {
		details = append(details, &errdetails.BadRequest_FieldViolation{Field: v.field, Description: v.description})
	}
	info := &errdetails.ErrorInfo{Reason: e.reason, Domain: errorDomain}
	var withDetails *status.Status
	var err error
	if details != nil {
		withDetails, err = st.WithDetails(&errdetails.BadRequest{FieldViolations: details}, info)
	} else {
		withDetails, err = st.WithDetails(info)
	}
	if err != nil {
		return st
	}
	return withDetails
}

// modelError is the error as a PredictBatch item's result.
func (e *rpcError) modelError() *pb.ModelError {
	return &pb.ModelError{GrpcCode: int32(e.code), Reason: e.reason, Message: e.message}
}

func invalidFeatures(violations []violation) *rpcError {
	fields := make([]string, len(violations))
	for i, v := range violations {
		fields[i] = v.field
	}
	return &rpcError{
		code:       codes.InvalidArgument,
		reason:     "INVALID_ARGUMENT",
		message:    "invalid request: " + strings.Join(fields, ", "),
		violations: violations,
	}
}

var (
	errDeadline = &rpcError{codes.DeadlineExceeded, "DEADLINE_EXCEEDED", "the model did not finish before the deadline", nil}
	errCanceled = &rpcError{codes.Canceled, "CANCELLED", "the call was cancelled", nil}
	errInternal = &rpcError{codes.Internal, "INTERNAL", "internal error", nil}
)

// modelService serves one Diabetes model as rendezvous.v1.ModelService.
type modelService struct {
	pb.UnimplementedModelServiceServer
	model   *Diabetes
	version string
	log     *slog.Logger
	// now is the clock the request deadlines are read on (tests set it).
	now func() time.Time
}

func newModelService(model *Diabetes, version string, log *slog.Logger) *modelService {
	return &modelService{model: model, version: version, log: log, now: time.Now}
}

// Predict scores one request.
func (s *modelService) Predict(ctx context.Context, request *pb.PredictRequest) (*pb.PredictResponse, error) {
	response, err := s.predict(ctx, request)
	if err != nil {
		return nil, err
	}
	return response, nil
}

// PredictBatch scores each request on its own: a request that fails gets a ModelError
// result and the call still succeeds. Scoring is a ten-term dot product, so the items run
// one after the other; each is held to its own deadline.
func (s *modelService) PredictBatch(ctx context.Context, batch *pb.PredictBatchRequest) (*pb.PredictBatchResponse, error) {
	results := make([]*pb.PredictResult, len(batch.GetRequests()))
	for i, request := range batch.GetRequests() {
		response, err := s.predict(ctx, request)
		if err != nil {
			results[i] = &pb.PredictResult{Result: &pb.PredictResult_Error{Error: err.modelError()}}
		} else {
			results[i] = &pb.PredictResult{Result: &pb.PredictResult_Response{Response: response}}
		}
	}
	return &pb.PredictBatchResponse{Results: results}, nil
}

// GetModelMetadata describes the model.
func (s *modelService) GetModelMetadata(context.Context, *pb.GetModelMetadataRequest) (*pb.GetModelMetadataResponse, error) {
	return s.model.metadata, nil
}

// predict is one request's answer or its error; a panic is logged and answered INTERNAL.
func (s *modelService) predict(ctx context.Context, request *pb.PredictRequest) (response *pb.PredictResponse, failure *rpcError) {
	defer func() {
		if recovered := recover(); recovered != nil {
			s.log.Error("predict failed", "request_id", request.GetRequestId(),
				"panic", fmt.Sprint(recovered), "stack", string(debug.Stack()))
			response, failure = nil, errInternal
		}
	}()
	if failure = s.expired(ctx, request); failure != nil {
		s.log.Debug("expired request", "request_id", request.GetRequestId(), "error", failure.message)
		return nil, failure
	}
	score, violations := s.model.Score(request.GetFeatures())
	if violations != nil {
		failure = invalidFeatures(violations)
		s.log.Debug("invalid request", "request_id", request.GetRequestId(), "error", failure.message)
		return nil, failure
	}
	return &pb.PredictResponse{
		Score:        score,
		ModelVersion: s.version,
		Outputs:      map[string]*structpb.Value{"model": structpb.NewStringValue(s.model.algorithm)},
	}, nil
}

// expired is the error for a request that can no longer be answered in time: the call is
// cancelled or past its gRPC deadline, or the request's own deadline has passed.
func (s *modelService) expired(ctx context.Context, request *pb.PredictRequest) *rpcError {
	if err := ctx.Err(); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return errDeadline
		}
		return errCanceled
	}
	if deadline := request.GetDeadline(); deadline != nil && !s.now().Before(deadline.AsTime()) {
		return errDeadline
	}
	return nil
}
