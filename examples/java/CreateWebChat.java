// Runs a guest's whole flow through the flexwebchat facade, as docs/clients.md shows it for Java:
//
//   java CreateWebChat HOST:PORT ADDRESS_SID [--bad-requests N] [--burst N]
//   java CreateWebChat HOST:PORT --resume ACCESS_TOKEN
//
// Creates a chat with a request_id, a guest access token and a first message, then refreshes the
// token, on one channel with the shipped service config. With --resume, brings a guest back with
// its expired token, or says that the agent has ended the chat. Prints both replies as JSON and exits 0,
// or prints the status code and its google.rpc details as JSON and exits 1.
// --bad-requests N first makes N invalid calls on the same channel (a caller's typo in a loop):
// the channel must still retry an UNAVAILABLE afterwards. --burst N then makes N refreshes at
// once on the channel and reports how many streams the server refused.

import com.example.flexwebchat.v1.CreateWebChatRequest;
import com.example.flexwebchat.v1.CreateWebChatResponse;
import com.example.flexwebchat.v1.RefreshGuestTokenRequest;
import com.example.flexwebchat.v1.RefreshGuestTokenResponse;
import com.example.flexwebchat.v1.WebChatServiceGrpc;
import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Message;
import com.google.protobuf.util.JsonFormat;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.PreconditionFailure;
import com.google.rpc.RetryInfo;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ClientStreamTracer;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import java.io.InputStreamReader;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.UUID;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;

public final class CreateWebChat {
  // Replies with the proto's field names; google.rpc details in protobuf's JSON mapping.
  private static final JsonFormat.Printer REPLY_JSON =
      JsonFormat.printer().preservingProtoFieldNames().omittingInsignificantWhitespace();
  private static final JsonFormat.Printer DETAIL_JSON =
      JsonFormat.printer().omittingInsignificantWhitespace();

  /**
   * A channel whose calls gRPC itself retries (UNAVAILABLE, RESOURCE_EXHAUSTED), waiting as long
   * as the facade's grpc-retry-pushback-ms asks. The service config ships with the stubs; this
   * build puts it on the classpath. Use dns:///NAME:PORT with a headless Service so that
   * round_robin spreads calls over every replica.
   */
  @SuppressWarnings("unchecked") // Gson reads JSON objects as Maps
  static ManagedChannel connect(String target, ClientInterceptor... interceptors) throws Exception {
    Map<String, ?> serviceConfig;
    try (Reader json = new InputStreamReader(
        CreateWebChat.class.getResourceAsStream("/flexwebchat/v1/service_config.json"),
        StandardCharsets.UTF_8)) {
      serviceConfig = new Gson().fromJson(json, Map.class);
    }
    return Grpc.newChannelBuilder(target, InsecureChannelCredentials.create())
        .defaultServiceConfig(serviceConfig)
        .enableRetry()
        .intercept(interceptors)
        .build();
  }

  /**
   * One chat with a guest token and the guest's first message. requestId is made once per chat
   * and reused by every retry of it: that is what makes any retry (gRPC's own, or yours) return
   * the same conversation.
   */
  static CreateWebChatResponse createWebChat(
      Channel channel, String addressSid, String requestId, String initialMessage) {
    return WebChatServiceGrpc.newBlockingStub(channel)
        .withDeadlineAfter(10, TimeUnit.SECONDS) // always set a deadline
        .createWebChat(CreateWebChatRequest.newBuilder()
            .setAddressSid(addressSid)
            .setRequestId(requestId)
            .setIssueToken(true)
            .setInitialMessage(initialMessage)
            .build());
  }

  /**
   * A fresh token for the guest's conversation, before the old one expires (the browser's
   * tokenAboutToExpire). No Twilio call: it needs no request_id.
   */
  static RefreshGuestTokenResponse refreshGuestToken(Channel channel, String accessToken) {
    return WebChatServiceGrpc.newBlockingStub(channel)
        .withDeadlineAfter(10, TimeUnit.SECONDS)
        .refreshGuestToken(
            RefreshGuestTokenRequest.newBuilder().setAccessToken(accessToken).build());
  }

  /**
   * The guest came back after its token expired (a closed laptop, a page reload): the same
   * RefreshGuestToken, with the expired token, from the caller that created the chat. null when
   * the agent has ended the chat (CONVERSATION_CLOSED): offer the guest a new chat.
   */
  static RefreshGuestTokenResponse resumeGuestToken(Channel channel, String expiredToken)
      throws InvalidProtocolBufferException {
    try {
      return refreshGuestToken(channel, expiredToken);
    } catch (StatusRuntimeException error) {
      com.google.rpc.Status status = StatusProto.fromThrowable(error);
      for (Any detail : status == null ? List.<Any>of() : status.getDetailsList()) {
        if (detail.is(ErrorInfo.class)
            && detail.unpack(ErrorInfo.class).getReason().equals("CONVERSATION_CLOSED")) {
          return null;
        }
      }
      throw error;
    }
  }

  /** The status code and each google.rpc detail of a failed call, by type name. */
  static JsonObject errorDetails(StatusRuntimeException error) throws InvalidProtocolBufferException {
    JsonObject described = new JsonObject();
    described.addProperty("code", error.getStatus().getCode().name());
    com.google.rpc.Status status = StatusProto.fromThrowable(error);
    if (status == null) { // a status from gRPC itself (e.g. the deadline): no details
      described.addProperty("message", error.getStatus().getDescription());
      return described;
    }
    described.addProperty("message", status.getMessage());
    for (Any detail : status.getDetailsList()) {
      for (Class<? extends Message> kind :
          List.of(BadRequest.class, ErrorInfo.class, RetryInfo.class, PreconditionFailure.class)) {
        if (detail.is(kind)) {
          described.add(kind.getSimpleName(), json(DETAIL_JSON, detail.unpack(kind)));
        }
      }
    }
    return described;
  }

  /**
   * Retry (later, with the same request_id) only when the facade says when: a RetryInfo.
   * RESOURCE_EXHAUSTED without one (an oversized message) fails the same way every time.
   */
  static boolean shouldRetry(JsonObject described) {
    return described.has("RetryInfo");
  }

  public static void main(String[] args) throws Exception {
    String target = args[0];
    String addressSid = args[1];
    int badRequests = option(args, "--bad-requests");
    int burst = option(args, "--burst");
    RefusedStreams refused = new RefusedStreams();
    ManagedChannel channel = connect(target, refused);
    JsonObject out = new JsonObject();
    int exitCode = 0;
    try {
      if (addressSid.equals("--resume")) {
        RefreshGuestTokenResponse resumed = resumeGuestToken(channel, args[2]);
        if (resumed == null) {
          out.addProperty("chat_ended", true);
        } else {
          out.add("resumed", json(REPLY_JSON, resumed));
        }
      } else {
        guestFlow(channel, addressSid, badRequests, burst, refused, out);
      }
    } catch (StatusRuntimeException error) {
      JsonObject described = errorDetails(error);
      described.addProperty("retryable", shouldRetry(described));
      out = described;
      exitCode = 1;
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.out.println(new GsonBuilder().setPrettyPrinting().create().toJson(out));
    System.exit(exitCode);
  }

  /** The guest flow, optionally after bad requests and followed by a burst; replies to out. */
  private static void guestFlow(
      Channel channel, String addressSid, int badRequests, int burst, RefusedStreams refused,
      JsonObject out) throws Exception {
    if (badRequests > 0) {
      out.add("bad_requests", makeBadRequests(channel, badRequests));
    }
    CreateWebChatResponse created =
        createWebChat(channel, addressSid, UUID.randomUUID().toString(), "Hello, I need help");
    out.add("created", json(REPLY_JSON, created));
    // An empty initial_message_sid: the chat exists, but the first message was not posted.
    RefreshGuestTokenResponse refreshed = refreshGuestToken(channel, created.getAccessToken());
    out.add("refreshed", json(REPLY_JSON, refreshed));
    if (burst > 0) {
      out.add("burst", refreshAtOnce(channel, refreshed.getAccessToken(), burst, refused));
    }
  }

  /** Calls with an invalid address_sid, each answered INVALID_ARGUMENT: counted by code. */
  private static JsonObject makeBadRequests(Channel channel, int count) {
    Map<String, Integer> codes = new TreeMap<>();
    for (int i = 0; i < count; i++) {
      try {
        createWebChat(channel, "IS" + "0".repeat(32), UUID.randomUUID().toString(), "");
        codes.merge("OK", 1, Integer::sum);
      } catch (StatusRuntimeException error) {
        codes.merge(error.getStatus().getCode().name(), 1, Integer::sum);
      }
    }
    return new Gson().toJsonTree(codes).getAsJsonObject();
  }

  /** count refreshes started at once on one channel: outcomes by code, and refused streams. */
  private static JsonObject refreshAtOnce(
      Channel channel, String accessToken, int count, RefusedStreams refused)
      throws InterruptedException {
    Map<String, Integer> codes = new TreeMap<>();
    CountDownLatch done = new CountDownLatch(count);
    RefreshGuestTokenRequest request =
        RefreshGuestTokenRequest.newBuilder().setAccessToken(accessToken).build();
    WebChatServiceGrpc.WebChatServiceStub stub =
        WebChatServiceGrpc.newStub(channel).withDeadlineAfter(30, TimeUnit.SECONDS);
    for (int i = 0; i < count; i++) {
      stub.refreshGuestToken(request, new StreamObserver<RefreshGuestTokenResponse>() {
        @Override public void onNext(RefreshGuestTokenResponse reply) {}

        @Override public void onError(Throwable error) {
          Status status = Status.fromThrowable(error);
          if (String.valueOf(status.getDescription()).contains("REFUSED_STREAM")) {
            refused.failedCalls.incrementAndGet();
          }
          finish(status.getCode().name());
        }

        @Override public void onCompleted() {
          finish("OK");
        }

        private void finish(String code) {
          synchronized (codes) {
            codes.merge(code, 1, Integer::sum);
          }
          done.countDown();
        }
      });
    }
    done.await();
    JsonObject report = new Gson().toJsonTree(codes).getAsJsonObject();
    report.addProperty("refused_streams", refused.count());
    return report;
  }

  /**
   * Streams the server refused (RST_STREAM REFUSED_STREAM): grpc-java retries such a stream
   * once, transparently, and fails the call if it is refused again.
   */
  static final class RefusedStreams implements ClientInterceptor {
    final AtomicInteger transparentRetries = new AtomicInteger();
    final AtomicInteger failedCalls = new AtomicInteger();

    int count() {
      return transparentRetries.get() + failedCalls.get();
    }

    @Override
    public <Q, R> ClientCall<Q, R> interceptCall(
        MethodDescriptor<Q, R> method, CallOptions options, Channel next) {
      ClientStreamTracer.Factory tracer = new ClientStreamTracer.Factory() {
        @Override
        public ClientStreamTracer newClientStreamTracer(
            ClientStreamTracer.StreamInfo info, Metadata headers) {
          if (info.isTransparentRetry()) {
            transparentRetries.incrementAndGet();
          }
          return new ClientStreamTracer() {};
        }
      };
      return next.newCall(method, options.withStreamTracerFactory(tracer));
    }
  }

  private static JsonObject json(JsonFormat.Printer printer, Message message)
      throws InvalidProtocolBufferException {
    return JsonParser.parseString(printer.print(message)).getAsJsonObject();
  }

  private static int option(String[] args, String name) {
    for (int i = 2; i + 1 < args.length; i++) {
      if (args[i].equals(name)) {
        return Integer.parseInt(args[i + 1]);
      }
    }
    return 0;
  }
}
