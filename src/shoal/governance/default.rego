# Shoal's default policy on every update (shoal.governance.policy).
#
# A policy is Rego in package shoal.policy. The input is one batch of updates
# (a round's, or one client's), as columns: input.client_id[i] is the client of
# update i, input.l2_norm[i] its L2 norm, and so on (see README, "Policy").
# data.shoal.bounds holds the [policy] bounds. A rule denies update i by adding
# [i, code, detail] to deny: the code is a stable key (the metrics row counts
# denials by code), the detail says why in words. An update no rule denies is
# allowed. A number the shell could not know (the norm of an update sealed by
# secure aggregation, a budget under no DP) is null: a rule must test is_number.
# Two quirks of rego-cpp 1.x to write around: bind a column's value to a variable
# before a function takes it (c := input.client_id[i]; startswith(c, "x")), since a
# call whose argument generates the index can miss matches; test is_number(n)
# before comparing n, since null > 10 is true there; and test each value, since
# max() over an array compares numbers as text.
package shoal.policy

import rego.v1

bounds := data.shoal.bounds

deny contains [i, "signature_unverified", sprintf("the request's signature is %v", [s])] if {
	some i
	s := input.signature[i]
	not s in {"verified", "in_process"}
}

deny contains [i, "client_not_active", sprintf("client %v is %v", [input.client_id[i], s])] if {
	some i
	s := input.status[i]
	s != "active"
}

deny contains [i, "versions_incompatible", concat("; ", problems)] if {
	some i
	problems := input.version_problems[i]
	count(problems) > 0
}

deny contains [i, "privacy_budget_spent", sprintf("remaining epsilon %v", [e])] if {
	some i
	e := input.remaining_epsilon[i]
	is_number(e)
	e <= 0
}

deny contains [i, "l2_norm_above_bound", sprintf("l2 norm %v above the bound %v", [n, b])] if {
	b := bounds.max_l2_norm
	some i
	n := input.l2_norm[i]
	is_number(n)
	n > b
}

deny contains [
	i, "relative_l2_norm_above_bound",
	sprintf("l2 norm %v times the round's median, above %v", [r, b]),
] if {
	b := bounds.max_relative_l2_norm
	some i
	r := input.relative_l2_norm[i]
	is_number(r)
	r > b
}

deny contains [i, "examples_above_cap", sprintf("%v examples above the cap %v", [n, b])] if {
	b := bounds.max_examples
	some i
	n := input.num_examples[i]
	is_number(n)
	n > b
}
