# The two daemon configs the performance scripts measure, sourced by
# profile.sh, ab.sh, redis_compare.sh and instructions.sh (run from the
# repository's root). LISTEN is the inside of `listen = [...]`, for example
# '"127.0.0.1:7979", "unix:/tmp/x/one.sock"'.

# one_limit_config LISTEN DATA_DIR: one fixed daily limit per subject,
# fsync durability, usage history on (the default).
one_limit_config() {
  cat <<TOML
[server]
listen = [$1]
max_connections = 1000
[storage]
data_dir = "$2"
durability = "fsync"
[log]
level = "warn"
[[plans]]
name = "bench"
default = true
  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 1000000000
TOML
}

# shipped_config LISTEN DATA_DIR: the shipped quotad.toml (prices, caps,
# alerts, a breaker, an anomaly flag, per-model history) on these addresses.
shipped_config() {
  sed -e "s|^listen = .*|listen = [$1]\nmax_connections = 1000|" -e "s|^data_dir = .*|data_dir = \"$2\"|" quotad.toml
  printf '\n[log]\nlevel = "warn"\n'
}
