-- Running pipelines hold the rule set in memory; tell them when it changes.
CREATE FUNCTION cityops_notify_rule_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cityops_rules', coalesce(NEW.name, OLD.name));
    RETURN NULL;
END
$$;

CREATE TRIGGER rules_notify_change
AFTER INSERT OR DELETE OR UPDATE ON rules
FOR EACH ROW EXECUTE FUNCTION cityops_notify_rule_change();

-- An alert opened while a silence matched it keeps a reference to that silence: it is recorded and
-- visible, but the feed can leave it out.
ALTER TABLE alerts ADD COLUMN silence_id integer REFERENCES silences (id) ON DELETE SET NULL;

-- The flap check looks up a fingerprint's most recently resolved alert.
CREATE INDEX alerts_fingerprint_resolved ON alerts (fingerprint, resolved_at DESC) WHERE state = 'resolved';
-- Shelved alerts come back when their time is up.
CREATE INDEX alerts_shelved_until ON alerts (shelved_until) WHERE state = 'shelved';
