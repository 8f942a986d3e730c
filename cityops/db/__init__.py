"""Database access: connections and pool, migrations, storage-mode maintenance."""
