// The Functions host's own storage (AzureWebJobsStorage): timer schedule status, locks and
// blob leases. The host reaches it with the app's identity.

param env string
param location string
param tags object
@description('The app identity\'s principal id.')
param principalId string
@description('The Azure Files share the app\'s files are mounted from (WEBSITE_CONTENTSHARE).')
param contentShareName string

resource account 'Microsoft.Storage/storageAccounts@2023-01-01' = {
  // Storage account names are 3-24 lowercase letters and digits: in staging, uniqueString()'s
  // 13 characters would make 26, and the name keeps 11 of them.
  name: take('stsync${env}${uniqueString(resourceGroup().id)}', 24)
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    supportsHttpsTrafficOnly: true
    // The Elastic Premium content share is Azure Files, which the platform mounts with the
    // account key (kept in Key Vault); everything the host itself does is identity-based.
    allowSharedKeyAccess: true
  }
}

// The app's content share, made here: its connection string is a Key Vault reference, which
// the platform cannot resolve while it validates the setting, so validation is skipped and the
// share must already exist.
resource files 'Microsoft.Storage/storageAccounts/fileServices@2023-01-01' = {
  parent: account
  name: 'default'
}

resource contentShare 'Microsoft.Storage/storageAccounts/fileServices/shares@2023-01-01' = {
  parent: files
  name: contentShareName
}

// roles: what the host needs for an identity-based AzureWebJobsStorage.
var roles = [
  'b7e6dc6d-f1e8-4753-8033-0f276bb0955b' // Storage Blob Data Owner: leases, schedule status
  '974c5e8b-45b9-4653-ba55-5f855dd0fb88' // Storage Queue Data Contributor: host queues
  '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3' // Storage Table Data Contributor: host tables
]

resource grants 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in roles: {
  name: guid(account.id, principalId, role)
  scope: account
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]

output name string = account.name
output contentShareName string = contentShare.name
