"""PostgreSQL enforces the ledger's rules itself, behind any code path:

- at commit, every transaction touched has entries summing to zero (a DEFERRABLE
  INITIALLY DEFERRED constraint trigger, so the entries of one transaction may be
  inserted one by one);
- entries are append-only: UPDATE and DELETE are refused (TRUNCATE, used by test
  teardown, is not a row operation).

SQLite has no equivalent; there `ledger_post` is the only check.
"""

from django.db import migrations

FORWARD = """
CREATE FUNCTION billing_entry_transaction_balanced() RETURNS trigger AS $$
DECLARE
    total bigint;
BEGIN
    SELECT COALESCE(SUM(amount), 0) INTO total FROM billing_entry WHERE transaction_id = NEW.transaction_id;
    IF total <> 0 THEN
        RAISE EXCEPTION 'ledger transaction % is unbalanced: its entries sum to %', NEW.transaction_id, total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE CONSTRAINT TRIGGER billing_entry_balanced
    AFTER INSERT ON billing_entry
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION billing_entry_transaction_balanced();

CREATE FUNCTION billing_entry_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger entries are append-only; post a correcting transaction instead'
        USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER billing_entry_append_only
    BEFORE UPDATE OR DELETE ON billing_entry
    FOR EACH ROW EXECUTE FUNCTION billing_entry_append_only();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS billing_entry_append_only ON billing_entry;
DROP FUNCTION IF EXISTS billing_entry_append_only();
DROP TRIGGER IF EXISTS billing_entry_balanced ON billing_entry;
DROP FUNCTION IF EXISTS billing_entry_transaction_balanced();
"""


def forward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD, params=None)


def backward(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(BACKWARD, params=None)


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]

    operations = [migrations.RunPython(forward, backward)]
