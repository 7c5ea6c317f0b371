// Command create-webchat runs a guest's whole flow through the flexwebchat facade, as
// docs/clients.md shows it for Go callers:
//
//	create-webchat HOST:PORT ADDRESS_SID
//	create-webchat HOST:PORT --resume ACCESS_TOKEN
//
// It creates a chat with a request_id, a guest access token and the guest's first message, then
// refreshes the token, on one channel with the shipped service config. With --resume, it brings
// a guest back with its expired token, or says that the agent has ended the chat. It prints both replies as
// JSON and exits 0, or prints the status code and its google.rpc details (BadRequest, ErrorInfo,
// RetryInfo, PreconditionFailure) as JSON and exits 1. The stubs come from
// `buf generate --template ../buf.gen.yaml` (managed mode sets go_package).
package main

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"
	"unicode"

	flexwebchatv1 "example.com/flexwebchat/examples/go/gen/go/flexwebchat/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/runtime/protoimpl"
)

// serviceConfig is generated/flexwebchat/v1/service_config.json, copied next to this file and
// built into the binary, which therefore runs from any directory.
//
//go:embed service_config.json
var serviceConfig string

func main() {
	switch {
	case len(os.Args) == 4 && os.Args[2] == "--resume":
		os.Exit(resume(os.Args[1], os.Args[3]))
	case len(os.Args) == 3:
		os.Exit(run(os.Args[1], os.Args[2]))
	}
	fmt.Fprintln(os.Stderr, "usage: create-webchat HOST:PORT ADDRESS_SID | HOST:PORT --resume ACCESS_TOKEN")
	os.Exit(2)
}

// connect opens a channel with the shipped service config: gRPC retries UNAVAILABLE and
// RESOURCE_EXHAUSTED itself and waits as long as the facade asks (grpc-retry-pushback-ms);
// round_robin over replicas with a dns:/// target naming a headless Service. (grpc-go before
// 1.40: GRPC_GO_RETRY=on.)
func connect(target string) (*grpc.ClientConn, error) {
	return grpc.Dial(target, grpc.WithInsecure(), grpc.WithDefaultServiceConfig(serviceConfig))
}

func run(target, addressSid string) int {
	conn, err := connect(target)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer conn.Close()
	client := flexwebchatv1.NewWebChatServiceClient(conn)

	created, err := createWebChat(client, addressSid, newUUID(), "Hello, I need help")
	if err != nil {
		return failed(err)
	}
	// An empty initial_message_sid: the chat exists, but the first message was not posted.
	refreshed, err := refreshGuestToken(client, created.AccessToken)
	if err != nil {
		return failed(err)
	}
	printJSON(map[string]json.RawMessage{"created": replyJSON(created), "refreshed": replyJSON(refreshed)})
	return 0
}

func resume(target, expiredToken string) int {
	conn, err := connect(target)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer conn.Close()
	resumed, err := resumeGuestToken(flexwebchatv1.NewWebChatServiceClient(conn), expiredToken)
	switch {
	case err != nil:
		return failed(err)
	case resumed == nil:
		printJSON(map[string]bool{"chat_ended": true})
	default:
		printJSON(map[string]json.RawMessage{"resumed": replyJSON(resumed)})
	}
	return 0
}

// createWebChat makes one chat with a guest token and the guest's first message. requestID is
// made once per chat and reused by every retry of it: retries then never create a second
// conversation.
func createWebChat(client flexwebchatv1.WebChatServiceClient, addressSid, requestID, firstMessage string) (*flexwebchatv1.CreateWebChatResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // always a deadline
	defer cancel()
	return client.CreateWebChat(ctx, &flexwebchatv1.CreateWebChatRequest{
		AddressSid:     addressSid,
		RequestId:      requestID,
		IssueToken:     true,
		InitialMessage: firstMessage,
	})
}

// refreshGuestToken gets a fresh token for the guest's conversation before the old one expires
// (the browser's tokenAboutToExpire). No Twilio call: it needs no request_id.
func refreshGuestToken(client flexwebchatv1.WebChatServiceClient, accessToken string) (*flexwebchatv1.RefreshGuestTokenResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return client.RefreshGuestToken(ctx, &flexwebchatv1.RefreshGuestTokenRequest{AccessToken: accessToken})
}

// resumeGuestToken brings back a guest whose token expired (a closed laptop, a page reload): the
// same RefreshGuestToken, with the expired token, from the caller that created the chat. nil, nil
// when the agent has ended the chat (CONVERSATION_CLOSED): offer the guest a new chat.
func resumeGuestToken(client flexwebchatv1.WebChatServiceClient, expiredToken string) (*flexwebchatv1.RefreshGuestTokenResponse, error) {
	resumed, err := refreshGuestToken(client, expiredToken)
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.Reason == "CONVERSATION_CLOSED" {
			return nil, nil
		}
	}
	return resumed, err
}

func failed(err error) int {
	described := describe(err)
	described["retryable"] = shouldRetry(described)
	printJSON(described)
	return 1
}

// describe returns the status code and each google.rpc detail of a failed call, by type name.
func describe(err error) map[string]interface{} {
	st := status.Convert(err)
	described := map[string]interface{}{"code": codeName(st.Code()), "message": st.Message()}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			described["BadRequest"] = asJSON(d)
		case *errdetails.ErrorInfo:
			described["ErrorInfo"] = asJSON(d)
		case *errdetails.RetryInfo:
			described["RetryInfo"] = asJSON(d)
		case *errdetails.PreconditionFailure:
			described["PreconditionFailure"] = asJSON(d)
		}
	}
	return described
}

// shouldRetry: retry (later, with the same request_id) only when the facade says when, a
// RetryInfo. RESOURCE_EXHAUSTED without one (an oversized message) fails the same way every time.
func shouldRetry(described map[string]interface{}) bool {
	_, ok := described["RetryInfo"]
	return ok
}

// asJSON accepts both the protobuf API v2 messages of current genproto and the v1 ones of older
// releases (Debian's), through ProtoMessageV2Of.
func asJSON(message interface{}) json.RawMessage {
	return json.RawMessage(protojson.Format(protoimpl.X.ProtoMessageV2Of(message)))
}

// replyJSON writes a reply with the proto's field names, as the other examples print it.
func replyJSON(reply proto.Message) json.RawMessage {
	return json.RawMessage(protojson.MarshalOptions{UseProtoNames: true}.Format(reply))
}

func printJSON(value interface{}) {
	out, _ := json.MarshalIndent(value, "", "  ")
	fmt.Println(string(out))
}

// codeName turns Go's "InvalidArgument" into the canonical "INVALID_ARGUMENT".
func codeName(code codes.Code) string {
	var name strings.Builder
	previous := 'A'
	for _, r := range code.String() {
		if unicode.IsUpper(r) && unicode.IsLower(previous) {
			name.WriteByte('_')
		}
		name.WriteRune(unicode.ToUpper(r))
		previous = r
	}
	return name.String()
}

func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
