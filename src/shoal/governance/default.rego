# Shoal's default policy on every update (shoal.governance.policy).
#
# A policy is Rego in package shoal.policy. The input is one batch of updates
# (a round's, or one client's), as columns: input.client_id[i] is the client of
# update i, input.l2_norm[i] its L2 norm, and so on (see README, "Policy").
# Beside the columns, their summaries: input.highest.l2_norm is the largest
# norm of the batch (null where none is a number), input.lowest the smallest,
# input.distinct.status the distinct statuses. data.shoal.bounds holds the
# [policy] bounds. A rule denies update i by adding [i, code, detail] to deny:
# the code is a stable key (the metrics row counts denials by code), the detail
# says why in words. An update no rule denies is allowed. A number the shell
# could not know (the norm of an update sealed by secure aggregation, a budget
# under no DP) is null: a rule must test is_number.
#
# Each rule here first asks a guard of its own (a rule, not a line of its body:
# rego-cpp would enumerate the index first) whether any update of the batch can
# break it, from the summaries. rego-cpp takes microseconds per update and rule,
# so a clean round of 100 updates costs 3 ms unguarded and 0.15 ms guarded; the
# rule's own test, update by update, stays the decision.
#
# Two quirks of rego-cpp 1.x to write around: bind a column's value to a variable
# before a function takes it (c := input.client_id[i]; startswith(c, "x")), since a
# call whose argument generates the index can miss matches; test is_number(n)
# before comparing n, since null > 10 is true there; and test each value, since
# max() over an array compares numbers as text (input.highest does not).
package shoal.policy

import rego.v1

bounds := data.shoal.bounds

unverified_signature if {
	some s in input.distinct.signature
	not s in {"verified", "in_process"}
}

deny contains [i, "signature_unverified", sprintf("the request's signature is %v", [s])] if {
	unverified_signature
	some i
	s := input.signature[i]
	not s in {"verified", "in_process"}
}

inactive_client if {
	some s in input.distinct.status
	s != "active"
}

deny contains [i, "client_not_active", sprintf("client %v is %v", [input.client_id[i], s])] if {
	inactive_client
	some i
	s := input.status[i]
	s != "active"
}

incompatible_versions if {
	some problems in input.distinct.version_problems
	count(problems) > 0
}

deny contains [i, "versions_incompatible", concat("; ", problems)] if {
	incompatible_versions
	some i
	problems := input.version_problems[i]
	count(problems) > 0
}

budget_spent if {
	e := input.lowest.remaining_epsilon
	is_number(e)
	e <= 0
}

deny contains [i, "privacy_budget_spent", sprintf("remaining epsilon %v", [e])] if {
	budget_spent
	some i
	e := input.remaining_epsilon[i]
	is_number(e)
	e <= 0
}

norm_above_bound if {
	n := input.highest.l2_norm
	is_number(n)
	n > bounds.max_l2_norm
}

deny contains [i, "l2_norm_above_bound", sprintf("l2 norm %v above the bound %v", [n, b])] if {
	norm_above_bound
	b := bounds.max_l2_norm
	some i
	n := input.l2_norm[i]
	is_number(n)
	n > b
}

relative_norm_above_bound if {
	r := input.highest.relative_l2_norm
	is_number(r)
	r > bounds.max_relative_l2_norm
}

deny contains [
	i, "relative_l2_norm_above_bound",
	sprintf("l2 norm %v times the round's median, above %v", [r, b]),
] if {
	relative_norm_above_bound
	b := bounds.max_relative_l2_norm
	some i
	r := input.relative_l2_norm[i]
	is_number(r)
	r > b
}

examples_above_cap if {
	n := input.highest.num_examples
	is_number(n)
	n > bounds.max_examples
}

deny contains [i, "examples_above_cap", sprintf("%v examples above the cap %v", [n, b])] if {
	examples_above_cap
	b := bounds.max_examples
	some i
	n := input.num_examples[i]
	is_number(n)
	n > b
}
