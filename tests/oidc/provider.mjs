// A real OpenID Provider (panva/oidc-provider) for pvs-gateway's OIDC tests.
//
//   node provider.mjs --jwks keys.json [--port 0] [--client-id pvs-gateway]
//        [--client-secret S] [--redirect-uri URI]... [--post-logout-redirect-uri URI]...
//        [--resource URI]... [--access-token-ttl 300]
//
// Every flag also reads OIDC_TEST_<FLAG> from the environment (e.g. OIDC_TEST_PORT).
// Listens on 127.0.0.1 only. --port 0 picks a free port; either way the first
// line on stdout is `ready issuer=http://127.0.0.1:<port>` once it serves.
// SIGHUP re-reads the JWKS file (key rotation) and prints `reloaded kids=a,b`.
//
// What it offers (all standard, nothing hand-written for the gateway):
// - discovery, JWKS, authorization code + PKCE (required), refresh tokens,
//   userinfo, RP-initiated logout, client_credentials;
// - resource indicators (RFC 8707): a token request with resource=<one of
//   --resource> gets a JWT access token (RFC 9068, RS256) whose aud is that
//   resource and which carries email / preferred_username / groups;
// - the development login and consent forms (devInteractions) over plain HTTP:
//   any password is accepted; log in with a known account's id or e-mail;
// - a confidential client (--client-id / --client-secret) for the gateway, and
//   a machine client "pvs-robot" / "robot-secret" (groups ["robots"]) for
//   client_credentials tokens;
// - test-only `POST /__test/accounts/<id>` with JSON {"groups": [...]} to change
//   an account's groups (to test that a session refresh picks up changes).
import { readFileSync } from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    jwks: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'redirect-uri': { type: 'string', multiple: true },
    'post-logout-redirect-uri': { type: 'string', multiple: true },
    resource: { type: 'string', multiple: true },
    'access-token-ttl': { type: 'string' },
  },
});

function opt(name, fallback) {
  const env = process.env[`OIDC_TEST_${name.toUpperCase().replaceAll('-', '_')}`];
  const value = args[name] ?? (env === undefined ? undefined : (Array.isArray(fallback) ? env.split(',') : env));
  return value ?? fallback;
}

const port = Number(opt('port', '0'));
const jwksPath = opt('jwks', undefined);
if (!jwksPath) {
  console.error('provider.mjs: --jwks <file with a private JWKS> is required');
  process.exit(2);
}
const clientId = opt('client-id', 'pvs-gateway');
const clientSecret = opt('client-secret', 'gateway-secret-for-tests-only');
const redirectUris = opt('redirect-uri', ['http://127.0.0.1:8443/auth/callback']);
const postLogoutUris = opt('post-logout-redirect-uri', []);
const resources = opt('resource', ['https://pvs-gateway.test']);
const accessTokenTTL = Number(opt('access-token-ttl', '300'));

// The static accounts. Login with the id ("alice") or the e-mail address.
const accounts = {
  alice: { email: 'alice@example.test', name: 'Alice Example', groups: ['family', 'admins'] },
  bob: { email: 'bob@example.test', name: 'Bob Example', groups: ['guests'] },
  carol: { email: 'carol@example.test', name: 'Carol Example', groups: ['family'], email_verified: false },
};

function accountId(login) {
  if (accounts[login]) return login;
  return Object.keys(accounts).find((id) => accounts[id].email === login);
}

function accountClaims(id) {
  const a = accounts[id];
  return {
    sub: id,
    email: a.email,
    email_verified: a.email_verified ?? true,
    name: a.name,
    preferred_username: id,
    groups: [...a.groups],
  };
}

function readJwks() {
  const jwks = JSON.parse(readFileSync(jwksPath, 'utf8'));
  if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) {
    throw new Error(`${jwksPath}: no keys`);
  }
  return jwks;
}

function buildProvider(issuer, jwks) {
  const provider = new Provider(issuer, {
    jwks,
    clients: [
      {
        client_id: clientId,
        client_secret: clientSecret,
        redirect_uris: redirectUris,
        post_logout_redirect_uris: postLogoutUris,
        grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
        response_types: ['code'],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: 'pvs-robot',
        client_secret: 'robot-secret',
        redirect_uris: [],
        grant_types: ['client_credentials'],
        response_types: [],
        token_endpoint_auth_method: 'client_secret_basic',
        groups: ['robots'],
      },
    ],
    extraClientMetadata: { properties: ['groups'] },
    async findAccount(ctx, id) {
      const known = accountId(id);
      if (!known) return undefined;
      return { accountId: known, claims: async () => accountClaims(known) };
    },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    // JWT access tokens carry the identity the gateway maps (RFC 9068 leaves this open).
    async extraTokenClaims(ctx, token) {
      if (token.kind === 'ClientCredentials') {
        const client = await ctx.oidc.provider.Client.find(token.clientId);
        return { groups: client?.groups ?? [] };
      }
      if (token.accountId && accounts[token.accountId]) {
        const { email, preferred_username, groups } = accountClaims(token.accountId);
        return { email, preferred_username, groups };
      }
      return undefined;
    },
    // Refresh tokens without offline_access + prompt=consent, like many IdPs.
    async issueRefreshToken(ctx, client) {
      return client.grantTypeAllowed('refresh_token');
    },
    pkce: { required: () => true },
    cookies: { keys: ['pvs-gateway-test-cookie-key-not-secret'] },
    ttl: {
      AccessToken: accessTokenTTL,
      ClientCredentials: accessTokenTTL,
      IdToken: 3600,
      RefreshToken: 24 * 3600,
      Grant: 24 * 3600,
      Session: 24 * 3600,
      Interaction: 3600,
      AuthorizationCode: 60,
    },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => (oneOf ? oneOf[0] : undefined),
        useGrantedResource: () => true,
        getResourceServerInfo(ctx, resourceIndicator) {
          if (!resources.includes(resourceIndicator)) {
            throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          }
          return {
            scope: 'api:read',
            audience: resourceIndicator,
            accessTokenTTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
  });
  return provider;
}

function testEndpoints(req, res) {
  const match = /^\/__test\/accounts\/([^/]+)$/.exec(req.url ?? '');
  if (!match || req.method !== 'POST') return false;
  let body = '';
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => {
    const account = accounts[decodeURIComponent(match[1])];
    if (!account) {
      res.writeHead(404).end();
      return;
    }
    try {
      const { groups } = JSON.parse(body);
      account.groups = [...groups];
      res.writeHead(204).end();
    } catch {
      res.writeHead(400).end();
    }
  });
  return true;
}

const server = http.createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  let handler = buildProvider(issuer, readJwks()).callback();
  server.on('request', (req, res) => {
    if (!testEndpoints(req, res)) handler(req, res);
  });
  process.on('SIGHUP', () => {
    try {
      const jwks = readJwks();
      handler = buildProvider(issuer, jwks).callback();
      console.log(`reloaded kids=${jwks.keys.map((k) => k.kid).join(',')}`);
    } catch (err) {
      console.log(`reload failed: ${err.message}`);
    }
  });
  console.log(`ready issuer=${issuer}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  });
}
