# A job's own policy, beside the bundled default (shoal.governance): updates from
# emulators never count, and neither do those of the fleet's test clients.
#
# Rules add [i, code, detail] to deny for update i of the batch (input columns:
# see the README's "Policy" section). Bind a column's value to a variable before a
# function takes it, as below: rego-cpp can miss a match otherwise.
package shoal.policy

import rego.v1

deny contains [i, "device_class_refused", sprintf("device class %v may not train", [c])] if {
	some i
	c := input.device_class[i]
	c in {"emulator"}
}

deny contains [i, "test_client", sprintf("%v is a test client", [client])] if {
	some i
	client := input.client_id[i]
	startswith(client, "qa-")
}
