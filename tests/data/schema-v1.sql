-- Test data: schema.sql exactly as it was at schema version 1, for the migration test.
-- mailbox_guard: the one source of the SQLite schema.
-- schema-version: 1
--
-- A fresh store is created from this file; an older store is brought up to this
-- version by the numbered migrations in mailbox_guard/store/db.py (PRAGMA user_version).
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
    created_at REAL NOT NULL
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
    UNIQUE (host, port)
);

CREATE TABLE settings (                           -- typed in mailbox_guard/config.py
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
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
