"""Stub of modules/extra_networks.py (WebUI v1.10.1): the ``<name:args>`` network registry.

Faithful where it matters: ``register_extra_network`` overwrites by name, an alias is used
only when its name is not itself registered, and ``activate`` also calls every registered
network that the prompt did not mention, with an empty list.
"""
import json
import logging
import os
import re
from collections import defaultdict

from modules import errors

extra_network_registry = {}
extra_network_aliases = {}


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


def register_default_extra_networks():
    pass  # the WebUI registers its hypernetwork handler here


class ExtraNetworkParams:
    """``items`` are the colon-separated arguments; an item with exactly one '=' is named."""

    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            if isinstance(item, str) and item.count("=") == 1:
                key, value = item.split("=")
                self.named[key] = value
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data):
    res = {}
    for name, args in list(extra_network_data.items()):
        network = extra_network_registry.get(name, None)
        alias = extra_network_aliases.get(name, None)
        if network is None:
            network = alias
        if network is None:
            logging.info(f"Skipping unknown extra network: {name}")
            continue
        res.setdefault(network, []).extend(args)
    return res


def activate(p, extra_network_data):
    activated = []
    for network, args in lookup_extra_networks(extra_network_data).items():
        try:
            network.activate(p, args)
            activated.append(network)
        except Exception as e:
            errors.display(e, f"activating extra network {network.name} with arguments {args}")
    for name, network in extra_network_registry.items():
        if network in activated:
            continue
        try:
            network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {name}")


def deactivate(p, extra_network_data):
    data = lookup_extra_networks(extra_network_data)
    for network in data:
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {network.name}")
    for name, network in extra_network_registry.items():
        if network in data:
            continue
        try:
            network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating unmentioned extra network {name}")


re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res, extra_data = [], None
    for prompt in prompts:
        updated, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated)
    return res, extra_data


def get_user_metadata(filename, lister=None):
    if filename is None:
        return {}
    metadata_filename = os.path.splitext(filename)[0] + '.json'
    metadata = {}
    try:
        exists = lister.exists(metadata_filename) if lister else os.path.exists(metadata_filename)
        if exists:
            with open(metadata_filename, "r", encoding="utf8") as file:
                metadata = json.load(file)
    except Exception as e:
        errors.display(e, f"reading extra network user metadata from {metadata_filename}")
    return metadata
