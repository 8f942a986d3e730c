-- Running pipelines keep the device registry in memory; tell them when it changes.
CREATE FUNCTION cityops_notify_device_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cityops_devices', coalesce(NEW.external_id, OLD.external_id));
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify_change
AFTER INSERT OR DELETE OR UPDATE OF external_id, tenant, kind, district, tags, enabled, parent_id ON devices
FOR EACH ROW EXECUTE FUNCTION cityops_notify_device_change();
