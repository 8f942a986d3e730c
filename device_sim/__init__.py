"""Fleet simulator, load generator and the device agent."""
