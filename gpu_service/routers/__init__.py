"""HTTP routers: decode, call a service, encode. No engine code here."""
