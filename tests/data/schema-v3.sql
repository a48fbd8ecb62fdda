-- Test data: schema.sql exactly as it was at schema version 3 (git show e5d9a57:schema.sql), for the migration test.
-- mailbox_guard: the one source of the SQLite schema.
-- schema-version: 3
--
-- A fresh store is created from this file; an older store is brought up to this
-- version by the numbered migrations in mailbox_guard/store.py (PRAGMA user_version).
-- Policy tables bump meta.policy_version through triggers, so every edit, from the
-- CLI or anything else, is seen by the running engine without extra bookkeeping.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('policy_version', '1');

-- ---------------------------------------------------------------- policy
CREATE TABLE domains (
    name       TEXT PRIMARY KEY COLLATE NOCASE,   -- a domain we guard (accept mail for)
    next_hop   TEXT,                              -- "host:port", NULL = deliver by MX
    created_at REAL NOT NULL,
    anti_impersonation INTEGER NOT NULL DEFAULT 1 -- its users may send only as themselves
);

CREATE TABLE recipients (                         -- when a domain has any, others get 550
    address    TEXT PRIMARY KEY COLLATE NOCASE,
    domain     TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE ON UPDATE CASCADE,
    created_at REAL NOT NULL
);
CREATE INDEX recipients_domain ON recipients(domain);

CREATE TABLE networks (                           -- trusted networks: may relay without auth
    cidr       TEXT PRIMARY KEY,
    comment    TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);

CREATE TABLE listeners (
    name       TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('inbound', 'submission', 'smtps')),
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL CHECK (port BETWEEN 0 AND 65535),
    require_auth   INTEGER NOT NULL DEFAULT 0,    -- accept only authenticated clients
    plaintext_auth INTEGER NOT NULL DEFAULT 0,    -- PLAIN/LOGIN without TLS (loopback only)
    UNIQUE (host, port)
);

CREATE TABLE settings (                           -- typed in mailbox_guard/config.py
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- ---------------------------------------------------------------- users
CREATE TABLE users (
    name          TEXT PRIMARY KEY COLLATE NOCASE, -- the login: the user's own address
    domain        TEXT NOT NULL,
    password_hash TEXT NOT NULL,                   -- argon2id (PHC string), never the password
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    changed_at    REAL NOT NULL
);

CREATE TABLE user_aliases (                        -- further addresses a user may send as
    address TEXT PRIMARY KEY COLLATE NOCASE,
    user    TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE ON UPDATE CASCADE
);

CREATE TABLE user_secrets (                       -- per-mechanism derived secrets (SCRAM keys,
    user      TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE ON UPDATE CASCADE,
    mechanism TEXT NOT NULL,                        -- DIGEST-MD5 H(A1)), never the password
    secret    TEXT NOT NULL,
    PRIMARY KEY (user, mechanism)
);

CREATE TABLE domain_mechanisms (                   -- legacy mechanisms a domain has switched on
    domain    TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE ON UPDATE CASCADE,
    mechanism TEXT NOT NULL CHECK (mechanism IN ('CRAM-MD5', 'DIGEST-MD5')),
    PRIMARY KEY (domain, mechanism)
);

CREATE TABLE password_policy (                     -- scope '*' is the server, else a domain
    scope          TEXT PRIMARY KEY COLLATE NOCASE,
    min_length     INTEGER NOT NULL,
    min_classes    INTEGER NOT NULL,               -- of: lower, upper, digit, other
    reject_common  INTEGER NOT NULL DEFAULT 1,
    reject_name    INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE auth_bans (                           -- brute force: refused early until `until`
    kind       TEXT NOT NULL CHECK (kind IN ('ip', 'user')),   -- 'ip': an address or a /24, /64
    key        TEXT NOT NULL,
    until      REAL NOT NULL,
    failures   INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, key)
);

CREATE TABLE auth_known (                          -- networks (/24, /64) a login succeeded from:
    login     TEXT NOT NULL,                       -- no penalty there when the login is under
    network   TEXT NOT NULL,                       -- attack (no trigger: not policy)
    last_seen REAL NOT NULL,
    PRIMARY KEY (login, network)
);

CREATE TRIGGER domains_ins AFTER INSERT ON domains BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER domains_upd AFTER UPDATE ON domains BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER domains_del AFTER DELETE ON domains BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER recipients_ins AFTER INSERT ON recipients BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER recipients_upd AFTER UPDATE ON recipients BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER recipients_del AFTER DELETE ON recipients BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER networks_ins AFTER INSERT ON networks BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER networks_upd AFTER UPDATE ON networks BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER networks_del AFTER DELETE ON networks BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER listeners_ins AFTER INSERT ON listeners BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER listeners_upd AFTER UPDATE ON listeners BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER listeners_del AFTER DELETE ON listeners BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER settings_ins AFTER INSERT ON settings BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER settings_upd AFTER UPDATE ON settings BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER users_ins AFTER INSERT ON users BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER users_upd AFTER UPDATE ON users BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER users_del AFTER DELETE ON users BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER user_aliases_ins AFTER INSERT ON user_aliases BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER user_aliases_upd AFTER UPDATE ON user_aliases BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER user_aliases_del AFTER DELETE ON user_aliases BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER password_policy_ins AFTER INSERT ON password_policy BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER password_policy_upd AFTER UPDATE ON password_policy BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER password_policy_del AFTER DELETE ON password_policy BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER auth_bans_ins AFTER INSERT ON auth_bans BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER auth_bans_upd AFTER UPDATE ON auth_bans BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER auth_bans_del AFTER DELETE ON auth_bans BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER user_secrets_ins AFTER INSERT ON user_secrets BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER user_secrets_upd AFTER UPDATE ON user_secrets BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER user_secrets_del AFTER DELETE ON user_secrets BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER domain_mechanisms_ins AFTER INSERT ON domain_mechanisms BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER domain_mechanisms_upd AFTER UPDATE ON domain_mechanisms BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER domain_mechanisms_del AFTER DELETE ON domain_mechanisms BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;
CREATE TRIGGER settings_del AFTER DELETE ON settings BEGIN UPDATE meta SET value = value + 1 WHERE key = 'policy_version'; END;

-- ---------------------------------------------------------------- queue
-- A message moves incoming -> active (leased by a delivery worker) -> delivered |
-- deferred (back to active when due) | bounced; hold parks it until released.
-- A lease that outlives its worker (crash) is given back on start and by a sweep.
CREATE TABLE messages (
    id            TEXT PRIMARY KEY,               -- queue id, time-ordered
    state         TEXT NOT NULL CHECK (state IN
                    ('incoming', 'active', 'deferred', 'hold', 'delivered', 'bounced')),
    mail_from     TEXT NOT NULL,                  -- '' is the null sender (a bounce)
    message_id    TEXT,                           -- the Message-ID header, for `messages why`
    size          INTEGER NOT NULL,
    received_at   REAL NOT NULL,
    next_attempt  REAL NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    lease_until   REAL,
    connection_id TEXT,
    listener      TEXT,
    client_ip     TEXT,
    last_error    TEXT,
    done_at       REAL
);
CREATE INDEX messages_due ON messages(state, next_attempt);
CREATE INDEX messages_msgid ON messages(message_id);

CREATE TABLE message_bodies (                     -- raw bytes as received, Received: prepended
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    data       BLOB NOT NULL
);

CREATE TABLE message_recipients (
    message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    recipient    TEXT NOT NULL,
    domain       TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'bounced')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_attempt REAL,
    last_reply   TEXT,
    remote       TEXT,
    PRIMARY KEY (message_id, recipient)
);

CREATE TABLE delivery_log (
    id         INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    at         REAL NOT NULL,
    outcome    TEXT NOT NULL CHECK (outcome IN ('delivered', 'deferred', 'bounced')),
    remote     TEXT,
    reply      TEXT
);
CREATE INDEX delivery_log_message ON delivery_log(message_id);

-- ---------------------------------------------------------------- verdict trace
CREATE TABLE connections (
    id         TEXT PRIMARY KEY,
    listener   TEXT NOT NULL,
    peer_ip    TEXT NOT NULL,
    peer_port  INTEGER,
    helo       TEXT,
    started_at REAL NOT NULL,
    ended_at   REAL,
    messages   INTEGER NOT NULL DEFAULT 0,
    rejected   INTEGER NOT NULL DEFAULT 0
);

-- Every result of every check of every phase: "why was this rejected / held?"
CREATE TABLE verdicts (
    id            INTEGER PRIMARY KEY,
    connection_id TEXT NOT NULL,
    message_id    TEXT,                           -- queue id once queued, else NULL
    seq           INTEGER NOT NULL,               -- order within the connection
    at            REAL NOT NULL,
    phase         TEXT NOT NULL,
    subject       TEXT NOT NULL DEFAULT '',       -- what was checked: sender, recipient, ...
    check_name    TEXT NOT NULL,
    symbol        TEXT NOT NULL,
    score         REAL NOT NULL DEFAULT 0,
    action        TEXT NOT NULL,                  -- accept | reject | tempfail | none
    reply         TEXT,
    detail        TEXT
);
CREATE INDEX verdicts_message ON verdicts(message_id);
CREATE INDEX verdicts_connection ON verdicts(connection_id);
CREATE INDEX verdicts_at ON verdicts(at);                  -- `rejects --since`
