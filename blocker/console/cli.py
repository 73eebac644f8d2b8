"""`blocker console add-user`: write one user, with an argon2 hash of the password, to the users file."""

from __future__ import annotations

import argparse
import getpass
import sys

from blocker.config import load_config
from blocker.console.auth import UsersFileError, add_user
from blocker.errors import ConfigError

MIN_PASSWORD = 12


def run_add_user(args: argparse.Namespace) -> int:
    path = args.users
    if path is None:
        try:
            path = load_config(args.config).console.users
        except ConfigError as err:
            print(err, file=sys.stderr)
            return 2
        if path is None:
            print(f"blocker console add-user: {args.config} has no console.users", file=sys.stderr)
            return 2
    password = None
    if not args.sso_only:
        if sys.stdin.isatty():
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                print("blocker console add-user: the passwords differ", file=sys.stderr)
                return 2
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if len(password) < MIN_PASSWORD:
            print(f"blocker console add-user: the password needs at least {MIN_PASSWORD} characters",
                  file=sys.stderr)
            return 2
    try:
        new = add_user(path, args.name, args.role, password, args.display)
    except UsersFileError as err:
        print(f"blocker console add-user: {err}", file=sys.stderr)
        return 2
    print(f"{'added' if new else 'replaced'} {args.name} ({', '.join(sorted(set(args.role)))}) in {path}")
    return 0
