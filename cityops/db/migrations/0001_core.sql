-- Registry, catalogue, rules, alerts, dead letters, keys and audit: identical in both storage modes.

CREATE TABLE metrics (
    id                smallint PRIMARY KEY,
    name              text NOT NULL UNIQUE,
    domain            text NOT NULL,
    unit              text NOT NULL,
    unit_code         text NOT NULL,
    unit_text         text,
    min               double precision NOT NULL,
    max               double precision NOT NULL,
    fiware_attribute  text,
    sample_interval_s integer NOT NULL CHECK (sample_interval_s > 0),
    description       text NOT NULL,
    tenant            text,  -- NULL: shipped catalogue; else registered by that tenant
    CHECK (min < max)
);

CREATE TABLE devices (
    id               integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    external_id      text NOT NULL UNIQUE CHECK (external_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    tenant           text NOT NULL,
    kind             text NOT NULL,
    name             text NOT NULL,
    lat              double precision CHECK (lat BETWEEN -90 AND 90),
    lon              double precision CHECK (lon BETWEEN -180 AND 180),
    district         text,
    tags             jsonb NOT NULL DEFAULT '{}'::jsonb,
    parent_id        integer REFERENCES devices (id) ON DELETE SET NULL,
    enabled          boolean NOT NULL DEFAULT true,
    last_seen        timestamptz,
    status           text CHECK (status IN ('online', 'offline')),
    status_at        timestamptz,
    credentials_hash text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_tenant_kind ON devices (tenant, kind);
CREATE INDEX devices_district ON devices (district);

CREATE TABLE rules (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       text NOT NULL,
    tenant     text,  -- NULL: applies to every tenant its selector matches
    enabled    boolean NOT NULL DEFAULT true,
    spec       jsonb NOT NULL,
    source     text,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT rules_tenant_name_key UNIQUE NULLS NOT DISTINCT (tenant, name)
);

CREATE TABLE alerts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    fingerprint     text NOT NULL,
    rule_id         integer REFERENCES rules (id) ON DELETE SET NULL,
    state           text NOT NULL
        CHECK (state IN ('pending', 'firing', 'acknowledged', 'shelved', 'resolved')),
    severity        text NOT NULL
        CHECK (severity IN ('informational', 'low', 'medium', 'high', 'critical')),
    tenant          text NOT NULL,
    labels          jsonb NOT NULL DEFAULT '{}'::jsonb,
    summary         text NOT NULL,
    evidence        jsonb NOT NULL DEFAULT '{}'::jsonb,
    count           integer NOT NULL DEFAULT 1,
    flap_count      integer NOT NULL DEFAULT 0,
    last_value      double precision,
    assignee        text,
    started_at      timestamptz NOT NULL,
    last_seen_at    timestamptz NOT NULL,
    acknowledged_at timestamptz,
    acknowledged_by text,
    resolved_at     timestamptz,
    shelved_until   timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- One open alert per fingerprint: concurrent writers can never open two.
CREATE UNIQUE INDEX alerts_one_open_per_fingerprint ON alerts (fingerprint) WHERE state <> 'resolved';
CREATE INDEX alerts_tenant_state ON alerts (tenant, state, severity);
CREATE INDEX alerts_started_at ON alerts (started_at DESC, id DESC);

CREATE TABLE alert_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the live feed's event id
    alert_id   bigint NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text NOT NULL,
    from_state text,
    to_state   text,
    actor      text,
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX alert_events_alert ON alert_events (alert_id, id);

CREATE TABLE silences (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text,
    matchers   jsonb NOT NULL,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    created_by text NOT NULL,
    comment    text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK (ends_at > starts_at)
);
CREATE INDEX silences_active ON silences (ends_at);

CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    topic        text NOT NULL,
    device       text,
    reason       text NOT NULL,
    detail       text NOT NULL,
    readings     integer NOT NULL DEFAULT 1,  -- how many readings this reject covers
    content_type text,
    payload      bytea NOT NULL
);
CREATE INDEX dead_letters_reason ON dead_letters (reason, received_at DESC);
CREATE INDEX dead_letters_received ON dead_letters (received_at DESC);

CREATE TABLE api_keys (
    id           integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    prefix       text NOT NULL UNIQUE,  -- the public part of the key, for lookup
    secret_hash  text NOT NULL,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    tenants      text[],  -- NULL: every tenant
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    object_type text NOT NULL,
    object_id   text,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_at ON audit_log (at DESC);
