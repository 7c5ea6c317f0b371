// Runs a guest's whole flow through the flexwebchat facade, as docs/clients.md shows it for
// Node.js:
//
//   node create-webchat.js HOST:PORT ADDRESS_SID
//   node create-webchat.js HOST:PORT --resume ACCESS_TOKEN
//
// Creates a chat with a request_id, a guest access token and the guest's first message, then
// refreshes the token, on one channel with the shipped service config. With --resume, brings a
// guest back with its expired token, or says that the agent has ended the chat. Prints both replies as
// JSON and exits 0, or prints the status code and its google.rpc details (BadRequest, ErrorInfo,
// RetryInfo, PreconditionFailure) as JSON and exits 1.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtoFiles = require('google-proto-files');

const REPO = path.join(__dirname, '..', '..');
// The proto straight from the checkout. keepCase: true, or proto-loader renames address_sid to
// addressSid, silently drops the snake_case field you set, and the facade answers that
// address_sid is required.
const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true };
const definition = protoLoader.loadSync('flexwebchat/v1/webchat.proto', {
  ...LOADER_OPTIONS,
  includeDirs: [path.join(REPO, 'proto')],
});
const { WebChatService } = grpc.loadPackageDefinition(definition).flexwebchat.v1;

// google.rpc.Status and its detail types are not in the proto: google-proto-files has them.
const rpcProtos = protobuf.loadSync([
  googleProtoFiles.getProtoPath('rpc', 'status.proto'),
  googleProtoFiles.getProtoPath('rpc', 'error_details.proto'),
]);
const Status = rpcProtos.lookupType('google.rpc.Status');
const DETAIL_TYPES = ['BadRequest', 'ErrorInfo', 'RetryInfo', 'PreconditionFailure'];

// retryPolicy (UNAVAILABLE, RESOURCE_EXHAUSTED) and round_robin, shipped with the proto stubs.
// gRPC then retries by itself, waiting as long as the facade's RetryInfo asks
// (grpc-retry-pushback-ms). Use a dns:///NAME:PORT target naming a headless Service so that
// round_robin spreads calls over every replica.
const SERVICE_CONFIG = fs.readFileSync(
  path.join(REPO, 'generated', 'flexwebchat', 'v1', 'service_config.json'),
  'utf8',
);

function connect(target) {
  return new WebChatService(target, grpc.credentials.createInsecure(), {
    'grpc.service_config': SERVICE_CONFIG,
  });
}

// One chat with a guest access token and the guest's first message. requestId is made once per
// chat and reused by every retry of it: that is what makes any retry (gRPC's own, or yours)
// return the same conversation.
function createWebChat(client, addressSid, requestId, firstMessage) {
  const request = {
    address_sid: addressSid,
    request_id: requestId,
    issue_token: true,
    initial_message: firstMessage,
  };
  const deadline = new Date(Date.now() + 10_000); // always set a deadline
  return new Promise((resolve, reject) => {
    client.CreateWebChat(request, { deadline }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

// A fresh token for the guest's conversation, before the old one expires (the browser's
// tokenAboutToExpire). No Twilio call: it needs no request_id.
function refreshGuestToken(client, accessToken) {
  const deadline = new Date(Date.now() + 10_000);
  return new Promise((resolve, reject) => {
    client.RefreshGuestToken({ access_token: accessToken }, { deadline }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

// The guest came back after its token expired (a closed laptop, a page reload): the same
// RefreshGuestToken, with the expired token, from the caller that created the chat. null when the
// agent has ended the chat (CONVERSATION_CLOSED): offer the guest a new chat.
async function resumeGuestToken(client, expiredToken) {
  try {
    return await refreshGuestToken(client, expiredToken);
  } catch (error) {
    if (errorDetails(error).ErrorInfo?.reason === 'CONVERSATION_CLOSED') {
      return null;
    }
    throw error;
  }
}

// The status code and each google.rpc detail of a failed call, by type name. The details travel
// in the grpc-status-details-bin trailer, a serialized google.rpc.Status.
function errorDetails(error) {
  const described = { code: grpc.status[error.code], message: error.details };
  const [raw] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!raw) {
    return described; // a status from gRPC itself (e.g. the deadline): no details
  }
  const status = Status.decode(raw);
  for (const any of status.details) {
    const name = any.type_url.split('/').pop().replace('google.rpc.', '');
    if (DETAIL_TYPES.includes(name)) {
      const type = rpcProtos.lookupType(`google.rpc.${name}`);
      described[name] = type.toObject(type.decode(any.value), { longs: String });
    }
  }
  return described;
}

// Retry (later, with the same request_id) only when the facade says when: a RetryInfo.
// RESOURCE_EXHAUSTED without one (an oversized message) fails the same way every time.
function shouldRetry(described) {
  return 'RetryInfo' in described;
}

async function main([target, addressSidOrFlag, expiredToken]) {
  const client = connect(target);
  try {
    if (addressSidOrFlag === '--resume') {
      const resumed = await resumeGuestToken(client, expiredToken);
      console.log(JSON.stringify(resumed ? { resumed } : { chat_ended: true }));
      return 0;
    }
    const created = await createWebChat(
      client,
      addressSidOrFlag,
      crypto.randomUUID(),
      'Hello, I need help',
    );
    // An empty initial_message_sid: the chat exists, but the first message was not posted.
    const refreshed = await refreshGuestToken(client, created.access_token);
    console.log(JSON.stringify({ created, refreshed }));
    return 0;
  } catch (error) {
    const described = errorDetails(error);
    console.log(JSON.stringify({ ...described, retryable: shouldRetry(described) }, null, 2));
    return 1;
  } finally {
    client.close();
  }
}

module.exports = {
  connect,
  createWebChat,
  refreshGuestToken,
  resumeGuestToken,
  errorDetails,
  shouldRetry,
};

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}
