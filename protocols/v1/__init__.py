"""Generated gRPC code for the lorafleet.v1 protocol, and the script that makes it."""
